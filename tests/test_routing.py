"""Routing through the running gateway: groups by rules and by cheapest-that-fits, tiers, fallback
when an upstream fails, and a circuit breaker that opens and closes. Checked in headers and ledger."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from margin.domain import Attribution, Call
from margin.policy import route
from tests.conftest import SHARED_DATA, Gateway, Mock, free_port, gateway_config, start_gateway, start_mock, stop

CHEAP = {"per_million": {"input": "0.1", "output": "0.4"}}
MID = {"per_million": {"input": "1", "output": "4"}}
DEAR = {"per_million": {"input": "10", "output": "30"}}


@pytest.fixture
def routed(mock_upstream: Mock, tmp_path: Path) -> Iterator[tuple[Gateway, int]]:
    dead_port = free_port()  # nothing listens here until the breaker test starts a mock on it
    cfg = gateway_config(tmp_path, mock_upstream.url, f"sqlite:///{tmp_path}/l.db")
    cfg["providers"].append({"name": "flaky", "kind": "openai", "base_url": f"http://127.0.0.1:{dead_port}/v1",
                             "timeout_s": 2, "connect_timeout_s": 0.5})
    cfg["models"] += [
        {"name": "small", "provider": "mock", "price": CHEAP, "context_window": 64, "quality": 0.3,
         "capabilities": []},
        {"name": "medium", "provider": "mock", "price": MID, "context_window": 8000, "quality": 0.6,
         "capabilities": ["json"]},
        {"name": "large", "provider": "mock", "price": DEAR, "context_window": 128000, "quality": 0.9},
        {"name": "unreliable", "provider": "flaky", "price": CHEAP, "fallbacks": ["large"]},
    ]
    cfg["groups"] = [
        {"name": "auto", "candidates": ["small", "medium", "large"], "strategy": "cheapest"},
        {"name": "support-bot", "candidates": ["small", "medium", "large"], "strategy": "rules",
         "rules": [{"tags": {"workflow": "legal"}, "model": "large"}, {"tools": True, "model": "large"},
                   {"prompt_tokens_gt": 30, "model": "medium"}]},
        {"name": "json-cascade", "candidates": ["small", "large"], "strategy": "cascade", "verify_json": True},
        {"name": "word-cascade", "candidates": ["small", "large"], "strategy": "cascade", "verify_regex": "[a-z]+"},
    ]
    cfg["circuit_breaker"] = {"failures": 2, "cooldown_s": 1.0}
    cfg["retry"] = {"attempts": 2, "backoff_ms": 10}
    gw = start_gateway(tmp_path, cfg)
    yield gw, dead_port
    assert gw.proc is not None
    stop(gw.proc)


def chat(gw: Gateway, key: str, model: str, text: str = "hello there", **extra: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}", **extra.pop("headers", {})}
    return httpx.post(gw.base_url + "/chat/completions", headers=headers, timeout=30,
                      json={"model": model, "max_tokens": 8, "messages": [{"role": "user", "content": text}], **extra})


def served(r: httpx.Response) -> str:
    assert r.status_code == 200, r.text
    return r.headers["x-margin-route"].split()[0]


def test_cheapest_that_fits(routed: tuple[Gateway, int]) -> None:
    gw, _ = routed
    k = gw.create_key(team="r")["key"]
    assert served(chat(gw, k, "auto")) == "small"
    assert served(chat(gw, k, "auto", text="long " * 200)) == "medium"  # small's 64-token context is too short
    r = chat(gw, k, "auto", tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])
    assert served(r) == "large"  # medium lacks tool use
    assert "group auto: cheapest of" in r.headers["x-margin-route"]
    assert served(chat(gw, k, "auto", headers={"X-Margin-Tier": "premium"})) == "large"  # strongest pool
    assert served(chat(gw, k, "auto", headers={"X-Margin-Tier": "batch"})) == "small"
    models = {m["id"] for m in httpx.get(gw.base_url + "/models", headers={"Authorization": f"Bearer {k}"}).json()[
        "data"]}
    assert {"auto", "support-bot"} <= models


def test_rules_by_tags_tools_and_prompt_length(routed: tuple[Gateway, int]) -> None:
    gw, _ = routed
    key = gw.create_key(team="r")
    k = key["key"]
    r = chat(gw, k, "support-bot", headers={"X-Margin-Tags": "workflow=legal"})
    assert served(r) == "large" and "rule 1 (workflow=legal)" in r.headers["x-margin-route"]
    assert served(chat(gw, k, "support-bot", text="word " * 40)) == "medium"
    r = chat(gw, k, "support-bot")
    assert served(r) == "small" and "no rule: cheapest" in r.headers["x-margin-route"]
    rows = gw.events(key["key_id"], expect=3)
    assert sorted(x["model"] for x in rows) == ["large", "medium", "small"]
    assert all(x["requested_model"] == "support-bot" for x in rows)
    assert any("rule 1" in x["route_reason"] for x in rows)


def test_fallback_and_circuit_breaker(routed: tuple[Gateway, int], tmp_path: Path) -> None:
    gw, dead_port = routed
    key = gw.create_key(team="r")
    k = key["key"]
    # 1) The provider is down: two attempts fail, then the fallback serves it.
    r = chat(gw, k, "unreliable")
    assert served(r) == "large" and "fallback from unreliable" in r.headers["x-margin-route"]
    rows = sorted(gw.events(key["key_id"], expect=3), key=lambda x: x["ts_start"])
    assert [x["model"] for x in rows] == ["unreliable", "unreliable", "large"]
    assert [x["status"] for x in rows] == [502, 502, 200]
    assert rows[1]["parent_event_id"] == rows[2]["parent_event_id"] == rows[0]["event_id"]
    # 2) Two consecutive failures opened the circuit: the next call goes straight to the fallback.
    assert httpx.get(gw.url + "/health").json()["circuits"] == {"flaky": "open"}
    r = chat(gw, k, "unreliable")
    assert served(r) == "large" and "circuit open on flaky" in r.headers["x-margin-route"]
    assert len(gw.events(key["key_id"], expect=4)) == 4  # no attempt was wasted on the open circuit
    # 3) The provider recovers; after the cool-down a trial call closes the circuit.
    mock = start_mock(dead_port)
    try:
        time.sleep(1.1)
        assert httpx.get(gw.url + "/health").json()["circuits"] == {"flaky": "half-open"}
        assert served(chat(gw, k, "unreliable")) == "unreliable"
        assert httpx.get(gw.url + "/health").json()["circuits"] == {}
    finally:
        stop(mock.proc)


def test_decide_is_pure_and_explains_refusals() -> None:
    targets = {"a": route.Target("a", "p", "a", context_window=10, input_per_mtok=1),
               "b": route.Target("b", "q", "b", context_window=10, input_per_mtok=2)}
    groups = {"g": route.Group("g", ("a", "b"))}
    call = Call("chat", "g", False, Attribution())
    d = route.decide(call, targets, (), groups, route.Need(prompt_tokens=50))
    assert isinstance(d, route.Refusal) and d.code == "no_model_fits" and "a: context 10 < 50" in d.message
    d = route.decide(call, targets, (), groups, route.Need(prompt_tokens=5), route.Health(frozenset({"p"})))
    assert not isinstance(d, route.Refusal) and d.model == "b" and d.fallbacks == ()
    w = route.Group("w", ("a", "b"), "weighted", weights=(("a", 3.0), ("b", 1.0)))
    picks = [route.decide(Call("chat", "w", False, Attribution()), targets, (), {"w": w}, route.Need(), None, x)
             for x in (0.1, 0.5, 0.74, 0.76, 0.99)]
    assert [p.model for p in picks if not isinstance(p, route.Refusal)] == ["a", "a", "a", "b", "b"]


def test_cascade_escalates_when_the_verifier_rejects_and_meters_both(routed: tuple[Gateway, int]) -> None:
    gw, _ = routed
    key = gw.create_key(team="c")
    # The mock answers in plain words: a JSON verifier rejects the cheap answer, the strong model answers.
    r = chat(gw, key["key"], "json-cascade")
    assert served(r) == "large"
    assert "cascade step 2 (answer is not valid JSON)" in r.headers["x-margin-route"]
    rows = sorted(gw.events(key["key_id"], expect=2), key=lambda x: x["ts_start"])
    assert [x["model"] for x in rows] == ["small", "large"] and all(x["status"] == 200 for x in rows)
    assert rows[1]["parent_event_id"] == rows[0]["event_id"]
    assert '"cascade_escalate"' in rows[0]["actions"] and float(rows[0]["cost_usd"]) > 0  # the real cost of both
    # A verifier the cheap answer passes: no escalation, one call.
    key2 = gw.create_key(team="c2")
    r = chat(gw, key2["key"], "word-cascade")
    assert served(r) == "small" and "cascade step 1" in r.headers["x-margin-route"]
    assert len(gw.events(key2["key_id"], expect=1)) == 1


def test_learned_router_group(mock_upstream: Mock, tmp_path: Path) -> None:
    import subprocess
    import sys

    mmlu = SHARED_DATA / "routing/routellm/mmlu"
    files = [str(mmlu / "mmlu_high_school_mathematics.csv"), str(mmlu / "mmlu_high_school_us_history.csv")]
    artefact = tmp_path / "router"
    r = subprocess.run([sys.executable, "-m", "margin", "router", "train", "--format", "routellm",
                        *[a for f in files for a in ("--train", f)], "--out", str(artefact),
                        "--target-quality", "0.95", "--calibration", "split"],  # split: fast enough for a test
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    cfg = gateway_config(tmp_path, mock_upstream.url, f"sqlite:///{tmp_path}/l.db")
    cfg["models"] += [{"name": "weak", "provider": "mock", "price": CHEAP},
                      {"name": "strong", "provider": "mock", "price": DEAR}]
    cfg["groups"] = [{"name": "smart", "candidates": ["weak", "strong"], "strategy": "learned",
                      "router": str(artefact),
                      "router_models": {"mistralai/Mixtral-8x7B-Instruct-v0.1": "weak",
                                        "gpt-4-1106-preview": "strong"}}]
    gw = start_gateway(tmp_path, cfg)
    try:
        key = gw.create_key(team="l")
        prompts = ["What is 2 + 2?", "Solve for x: 3x^2 - 12x + 9 = 0 and give both roots.",
                   "Who was the president of the United States during the Civil War?",
                   "Explain the significance of the Marbury v. Madison decision for judicial review."]
        seen = {served(chat(gw, key["key"], "smart", text=p)) for p in prompts}
        assert seen <= {"weak", "strong"} and seen
        rows = gw.events(key["key_id"], expect=len(prompts))
        assert all("group smart: learned:" in x["route_reason"] and " p=" in x["route_reason"] for x in rows)
    finally:
        assert gw.proc is not None
        stop(gw.proc)


def test_least_latency_and_key_default_tier(mock_upstream: Mock, tmp_path: Path) -> None:
    slow = start_mock(free_port(), ttft_ms=60.0)
    try:
        cfg = gateway_config(tmp_path, mock_upstream.url, f"sqlite:///{tmp_path}/l.db")
        cfg["providers"].append({"name": "slow", "kind": "openai", "base_url": slow.url})
        cfg["models"] += [{"name": "quick", "provider": "mock", "price": DEAR, "quality": 0.4},
                          {"name": "sluggish", "provider": "slow", "price": CHEAP, "quality": 0.9}]
        cfg["groups"] = [{"name": "fast", "candidates": ["quick", "sluggish"], "strategy": "least-latency"}]
        gw = start_gateway(tmp_path, cfg)
        try:
            k = gw.create_key(team="lat")["key"]
            first = {served(chat(gw, k, "fast")) for _ in range(2)}
            assert first == {"quick", "sluggish"}  # each measured once
            later = [served(chat(gw, k, "fast")) for _ in range(5)]
            assert later == ["quick"] * 5
            # A key's tags give its default tier; the header still wins.
            premium = gw.create_key(team="lat", tags={"tier": "premium"})["key"]
            assert served(chat(gw, premium, "fast")) == "sluggish"  # strongest pool
            assert served(chat(gw, premium, "fast", headers={"X-Margin-Tier": "standard"})) == "quick"
            r = chat(gw, premium, "fast", headers={"X-Margin-Tier": "gold"})
            assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_tier"
        finally:
            assert gw.proc is not None
            stop(gw.proc)
    finally:
        stop(slow.proc)
    bad = route.decide(Call("chat", "x", False, Attribution()), {}, (), {}, route.Need())
    assert isinstance(bad, route.Refusal)
