"""Cascade verifiers beyond JSON and regex: a log-probability threshold (where the provider returns
log-probabilities) and a small judge model whose call is metered and linked."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from margin.policy import cascade
from tests.conftest import Mock, free_port, gateway_config, start_gateway, start_mock, stop


def test_pure_checks() -> None:
    assert cascade.verify("fine", None, False, -0.5, [-0.1, -0.2]) == (True, "verified")
    ok, why = cascade.verify("unsure", None, False, -0.5, [-0.1, -2.0])
    assert not ok and "mean token logprob -1.050" in why
    assert cascade.verify("no logprobs returned", None, False, -0.5, [])[0]  # unverifiable: not held against it
    assert cascade.judge_verdict("YES") == (True, "judge: YES")
    assert cascade.judge_verdict("Yes.")[0] and not cascade.judge_verdict("NO")[0]
    assert not cascade.judge_verdict("")[0] and not cascade.judge_verdict("Maybe yes")[0]
    chat = {"choices": [{"logprobs": {"content": [{"token": "a", "logprob": -0.5}, {"token": "b", "logprob": -1.5}]}}]}
    assert cascade.token_logprobs(chat) == [-0.5, -1.5]
    assert cascade.token_logprobs({"choices": [{"logprobs": {"token_logprobs": [-1.0, None]}}]}) == [-1.0]


@pytest.fixture(scope="module")
def judge_mock() -> Iterator[Mock]:
    m = start_mock(free_port(), output_tokens=8, seed=3, answers=orjson.dumps({"judge-yes": "YES",
                                                                                "judge-no": "NO"}).decode())
    yield m
    stop(m.proc)


def _gateway(tmp: Path, mock: Mock, **group: Any) -> Any:
    cfg = gateway_config(tmp, mock.url, f"sqlite:///{tmp}/l.db")
    cfg["models"] += [{"name": "yes-judge", "provider": "mock", "upstream_model": "judge-yes",
                       "price": {"per_million": {"input": "0.05", "output": "0.1"}}},
                      {"name": "no-judge", "provider": "mock", "upstream_model": "judge-no",
                       "price": {"per_million": {"input": "0.05", "output": "0.1"}}}]
    cfg["groups"] = [{"name": "careful", "candidates": ["gpt-4o-mini", "gpt-4o"], "strategy": "cascade", **group}]
    return start_gateway(tmp, cfg)


def _ask(gw: Any, key: str, **headers: str) -> httpx.Response:
    return httpx.post(gw.base_url + "/chat/completions", timeout=30, headers={"Authorization": f"Bearer {key}",
                      **headers}, json={"model": "careful", "max_tokens": 8,
                                        "messages": [{"role": "user", "content": "What is 2+2?"}]})


def test_logprob_threshold_escalates_unsure_answers(judge_mock: Mock, tmp_path: Path) -> None:
    gw = _gateway(tmp_path, judge_mock, verify_min_logprob=-0.5)
    try:
        key = gw.create_key(team="t")["key"]
        sure = _ask(gw, key, **{"X-Mock-Logprob": "-0.1"})
        assert sure.status_code == 200 and sure.headers["x-margin-route"].startswith("gpt-4o-mini")
        assert "logprobs" not in sure.json()["choices"][0]  # asked for verification only, not returned
        unsure = _ask(gw, key, **{"X-Mock-Logprob": "-1.2"})
        assert unsure.status_code == 200 and unsure.headers["x-margin-route"].startswith("gpt-4o ")
        rows = gw.events(expect=3)
        escalated = next(r for r in rows if "cascade_escalate" in r["actions"])
        assert "logprob" in escalated["actions"] and escalated["model"] == "gpt-4o-mini"
    finally:
        stop(gw.proc)


@pytest.mark.parametrize(("judge", "served"), [("yes-judge", "gpt-4o-mini"), ("no-judge", "gpt-4o")])
def test_judge_model_decides_and_is_metered(judge_mock: Mock, tmp_path: Path, judge: str, served: str) -> None:
    gw = _gateway(tmp_path, judge_mock, verify_judge=judge)
    try:
        key = gw.create_key(team="t")["key"]
        r = _ask(gw, key)
        assert r.status_code == 200 and r.headers["x-margin-route"].split()[0] == served
        rows = gw.events(expect=3 if served == "gpt-4o" else 2)
        cheap = next(e for e in rows if e["model"] == "gpt-4o-mini")
        verdict = next(e for e in rows if e["model"] == judge)
        assert verdict["parent_event_id"] == cheap["event_id"] and float(verdict["cost_usd"]) > 0
        assert "cascade judge" in verdict["route_reason"]
    finally:
        stop(gw.proc)


def test_judge_of_a_responses_call_is_a_chat_call(judge_mock: Mock, tmp_path: Path) -> None:
    """The judge gets a chat request whatever endpoint the verified call used."""
    gw = _gateway(tmp_path, judge_mock, verify_judge="no-judge")
    try:
        key = gw.create_key(team="t")["key"]
        r = httpx.post(gw.base_url + "/responses", timeout=30, headers={"Authorization": f"Bearer {key}"},
                       json={"model": "careful", "input": "What is 2+2?", "max_output_tokens": 8})
        assert r.status_code == 200 and r.json()["object"] == "response" and r.headers["x-margin-route"].startswith(
            "gpt-4o ")
        rows = {e["model"]: e for e in gw.events(expect=3)}
        judge = rows["no-judge"]
        assert judge["endpoint"] == "chat" and judge["input_tokens"] > 0  # sent as chat: the mock read its messages
        assert rows["gpt-4o-mini"]["endpoint"] == rows["gpt-4o"]["endpoint"] == "response"
        assert orjson.loads(httpx.get(judge_mock.url.removesuffix("/v1") + "/mock/last_request").content).get(
            "input") == "What is 2+2?"  # the last upstream call was the strong model's, in Responses form
    finally:
        stop(gw.proc)


def test_learned_verifier_reads_the_cheap_answer(tmp_path: Path) -> None:
    """A cascade group with a learned verifier (margin router cascade-train): a cheap answer whose
    arithmetic is broken escalates to the strong model; a right one is returned."""
    from margin.router import cascade_eval as CE
    from margin.router.verifier import save_verifier
    from tests.test_router_cascade import STRONG, WEAK, _synthetic

    t = _synthetic()
    v = CE.fit(t, *CE.pair(t, STRONG))
    art = save_verifier(v, tmp_path / "verifier", operating_point={"rule": "gain_threshold", "value": 0.3},
                        costs={WEAK: 0.001, STRONG: 0.02}, training=t.summary())
    answers = {"eggs-right": "There are 3*4 = <<3*4=12>>12 eggs. #### 12",
               "eggs-wrong": "There are 3*4 = <<3*4=17>>17 eggs. #### 17"}
    mock = start_mock(free_port(), output_tokens=8, seed=3, answers=orjson.dumps(answers).decode())
    cfg = gateway_config(tmp_path, mock.url, f"sqlite:///{tmp_path}/l.db")
    cfg["models"] += [{"name": n, "provider": "mock", "upstream_model": n,
                       "price": {"per_million": {"input": "0.1", "output": "0.1"}}} for n in answers]
    cfg["groups"] = [{"name": f"math-{kind}", "candidates": [f"eggs-{kind}", "gpt-4o"], "strategy": "cascade",
                      "verifier": str(art), "router_models": {WEAK: f"eggs-{kind}", STRONG: "gpt-4o"}}
                     for kind in ("right", "wrong")]
    gw = start_gateway(tmp_path, cfg)
    try:
        key = gw.create_key(team="t")["key"]
        served = {}
        question = [{"role": "user", "content": "A box holds 3 rows of 4 eggs. How many eggs are in the box?"}]
        for kind in ("right", "wrong"):
            r = httpx.post(gw.base_url + "/chat/completions", timeout=30, headers={"Authorization": f"Bearer {key}"},
                           json={"model": f"math-{kind}", "max_tokens": 30, "messages": question})
            assert r.status_code == 200
            served[kind] = r.headers["x-margin-route"].split()[0]
        assert served == {"right": "eggs-right", "wrong": "gpt-4o"}
        rejected = next(e for e in gw.events(expect=3) if "cascade_escalate" in e["actions"])
        assert rejected["model"] == "eggs-wrong" and "learned verifier" in rejected["actions"]
    finally:
        stop(gw.proc)
        stop(mock.proc)
