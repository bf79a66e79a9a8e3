"""The official openai SDK against a running gateway and mock upstream; ledger rows checked field
by field. Runs once with the SQLite ledger and once with PostgreSQL (the `ledger_url` fixture)."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

import httpx
import openai
import orjson
import pytest

from tests.conftest import Gateway, Mock

D = Decimal
M = 1_000_000


def client(gw: Gateway, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url, api_key=key, max_retries=0)


def test_sync_chat_is_metered_field_by_field(gateway: Gateway, mock_upstream: Mock) -> None:
    k = gateway.create_key(org="acme", team="search", user="ana", app="assistant", env="prod")
    resp = client(gateway, k["key"]).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "one two three four five"}], max_tokens=8,
        extra_headers={"X-Margin-Tags": "workflow=kyc,feature=search", "X-Margin-Run-Id": "run-1",
                       "X-Margin-Agent": "planner", "X-Margin-Step": "3", "X-Request-Id": "req-abc"},
    )
    completion = resp.parse()
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == 9  # the mock counts 5 words + 4 per message
    assert completion.usage.completion_tokens == 8
    assert resp.headers["x-margin-route"] == "gpt-4o-mini via mock (requested)"
    # The upstream saw its own model id and the client's body otherwise unchanged.
    assert mock_upstream.last_request()["model"] == "gpt-4o-mini"

    [ev] = gateway.events(k["key_id"], expect=1)
    expected_cost = D(9) * D("0.15") / M + D(8) * D("0.6") / M
    assert D(resp.headers["x-margin-cost-usd"]) == expected_cost
    assert ev["event_id"] == resp.headers["x-margin-event-id"]
    assert ev["request_id"] == "req-abc"
    assert (ev["org"], ev["team"], ev["user"], ev["app"], ev["env"]) == ("acme", "search", "ana", "assistant", "prod")
    assert orjson.loads(ev["tags"]) == {"workflow": "kyc", "feature": "search"}
    assert (ev["run_id"], ev["workflow"], ev["agent"], ev["step"]) == ("run-1", "kyc", "planner", "3")
    assert ev["endpoint"] == "chat"
    assert (ev["requested_model"], ev["model"], ev["provider"], ev["route_reason"]) == (
        "gpt-4o-mini", "gpt-4o-mini", "mock", "requested")
    assert (ev["input_tokens"], ev["output_tokens"], ev["cached_input_tokens"], ev["reasoning_tokens"]) == (9, 8, 0, 0)
    assert ev["usage_source"] == "provider"
    assert D(ev["cost_usd"]) == expected_cost
    assert D(ev["cost_input_usd"]) == D(9) * D("0.15") / M
    assert D(ev["cost_output_usd"]) == D(8) * D("0.6") / M
    assert "genai-prices" in ev["price_source"]
    assert ev["status"] == 200 and ev["error_type"] is None and ev["stream"] == 0
    assert ev["latency_ms"] > 0 and ev["ttft_ms"] is None
    start, end = datetime.fromisoformat(ev["ts_start"]), datetime.fromisoformat(ev["ts_end"])
    assert start.tzinfo is not None and start <= end


async def test_async_sdk_concurrent_calls_each_metered_once(gateway: Gateway) -> None:
    import asyncio

    k = gateway.create_key(team="batch", user="bot")
    aclient = openai.AsyncOpenAI(base_url=gateway.base_url, api_key=k["key"], max_retries=0)
    results = await asyncio.gather(*(
        aclient.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": f"q {i}"}],
                                        max_tokens=4)
        for i in range(20)))
    await aclient.close()
    assert all(r.usage and r.usage.completion_tokens == 4 for r in results)
    evs = gateway.events(k["key_id"], expect=20)
    assert len(evs) == 20 and len({e["event_id"] for e in evs}) == 20
    assert sum(D(e["cost_usd"]) for e in evs) == 20 * (D(6) * D("2.5") / M + D(4) * D(10) / M)


def test_stream_metered_exactly_and_usage_hidden_unless_asked(gateway: Gateway, mock_upstream: Mock) -> None:
    k = gateway.create_key(team="chat")
    c = client(gateway, k["key"])
    chunks = list(c.chat.completions.create(model="gpt-4o-mini", stream=True, max_tokens=5,
                                            messages=[{"role": "user", "content": "stream me"}]))
    # margin asked the upstream for usage even though the client did not...
    assert mock_upstream.last_request()["stream_options"] == {"include_usage": True}
    # ...and did not show the client a usage chunk it never asked for.
    assert all(ch.usage is None for ch in chunks)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert len(text.split()) == 5

    with_usage = list(c.chat.completions.create(model="gpt-4o-mini", stream=True, max_tokens=5,
                                                stream_options={"include_usage": True},
                                                messages=[{"role": "user", "content": "stream me"}]))
    assert with_usage[-1].usage is not None and with_usage[-1].usage.completion_tokens == 5

    evs = gateway.events(k["key_id"], expect=2)
    for ev in evs:
        assert ev["stream"] == 1 and ev["status"] == 200
        assert (ev["input_tokens"], ev["output_tokens"], ev["usage_source"]) == (6, 5, "provider")
        assert D(ev["cost_usd"]) == D(6) * D("0.15") / M + D(5) * D("0.6") / M
        assert ev["ttft_ms"] is not None and ev["ttft_ms"] <= ev["latency_ms"]
        assert ev["tpot_ms"] is not None and ev["tpot_ms"] >= 0


def test_completions_and_embeddings_endpoints(gateway: Gateway) -> None:
    k = gateway.create_key(team="misc")
    c = client(gateway, k["key"])
    comp = c.completions.create(model="gpt-4o-mini", prompt="alpha beta gamma", max_tokens=3)
    assert comp.choices[0].text and comp.usage and comp.usage.completion_tokens == 3
    streamed = list(c.completions.create(model="gpt-4o-mini", prompt="alpha beta", max_tokens=3, stream=True))
    assert "".join(s.choices[0].text for s in streamed if s.choices).strip()
    emb = c.embeddings.create(model="gpt-4o-mini", input=["a b c", "d e"])
    assert len(emb.data) == 2
    models = {m.id for m in c.models.list()}
    assert {"gpt-4o-mini", "gpt-4o", "claude-sonnet"} <= models
    evs = gateway.events(k["key_id"], expect=3)
    assert sorted(e["endpoint"] for e in evs) == ["completion", "completion", "embedding"]
    assert all(e["status"] == 200 and e["input_tokens"] > 0 for e in evs)


@pytest.mark.parametrize(
    ("model", "cached", "reasoning", "expected"),
    [
        # OpenAI gpt-4o: 1.25 $/MTok for cached input. Prompt = 9 tokens (5 words + 4), 6 cached, 10 out.
        ("gpt-4o", 6, 0, D(3) * D("2.5") / M + D(6) * D("1.25") / M + D(10) * D(10) / M),
        # OpenAI o3-mini: reasoning tokens are output tokens (4.40 $/MTok), never billed twice:
        # the mock reports 10 visible + 7 reasoning = 17 completion tokens.
        ("o3-mini", 0, 7, D(9) * D("1.1") / M + D(17) * D("4.4") / M),
        # Anthropic Claude Sonnet 4.5 through the same OpenAI-compatible wire: 0.30 $/MTok cache reads.
        ("claude-sonnet", 4, 0, D(5) * D(3) / M + D(4) * D("0.3") / M + D(10) * D(15) / M),
    ],
)
def test_cached_and_reasoning_tokens_priced_by_type(gateway: Gateway, model: str, cached: int, reasoning: int,
                                                    expected: Decimal) -> None:
    k = gateway.create_key(team="pricing")
    r = client(gateway, k["key"]).chat.completions.with_raw_response.create(
        model=model, max_tokens=10, messages=[{"role": "user", "content": "one two three four five"}],
        extra_headers={"X-Mock-Cached-Tokens": str(cached), "X-Mock-Reasoning-Tokens": str(reasoning)})
    assert D(r.headers["x-margin-cost-usd"]) == expected
    [ev] = gateway.events(k["key_id"], expect=1)
    assert (ev["cached_input_tokens"], ev["reasoning_tokens"]) == (cached, reasoning)
    assert D(ev["cost_usd"]) == expected
    assert D(ev["cost_cache_read_usd"]) == cached * (D("1.25") if model == "gpt-4o" else D("0.3")) / M


def test_self_hosted_model_priced_by_gpu_time_with_energy(gateway: Gateway, mock_upstream: Mock) -> None:
    k = gateway.create_key(team="infra")
    client(gateway, k["key"]).chat.completions.create(
        model="house-model", max_tokens=10, messages=[{"role": "user", "content": "one two three four five"}])
    assert mock_upstream.last_request()["model"] == "llama-3.1-8b"
    [ev] = gateway.events(k["key_id"], expect=1)
    # $3.60/h = $0.001/s; 9 prompt tokens at 1000/s + 10 output at 100/s = 0.109 s -> $0.000109.
    assert D(ev["cost_usd"]) == D("0.000109")
    assert ev["energy_j"] == pytest.approx(700 * 0.109)


def test_upstream_without_usage_is_estimated_and_says_so(gateway: Gateway) -> None:
    k = gateway.create_key(team="est")
    c = client(gateway, k["key"])
    c.chat.completions.create(model="gpt-4o-mini", max_tokens=6, extra_headers={"X-Mock-Usage": "0"},
                              messages=[{"role": "user", "content": "count these tokens locally please"}])
    list(c.chat.completions.create(model="gpt-4o-mini", max_tokens=6, stream=True,
                                   extra_headers={"X-Mock-Usage": "0"},
                                   messages=[{"role": "user", "content": "count these tokens locally please"}]))
    evs = gateway.events(k["key_id"], expect=2)
    for ev in evs:
        assert ev["usage_source"] == "estimated"
        assert ev["input_tokens"] > 0 and ev["output_tokens"] == 6
        assert D(ev["cost_usd"]) > 0


def test_metrics_use_genai_names_without_user_labels(gateway: Gateway) -> None:
    k = gateway.create_key(team="metrics-team", user="secret-user")
    client(gateway, k["key"]).chat.completions.create(model="gpt-4o-mini", max_tokens=2,
                                                      messages=[{"role": "user", "content": "hi"}])
    text = httpx.get(gateway.url + "/metrics").text
    for name in ("gen_ai_client_token_usage_bucket", "gen_ai_client_operation_duration_seconds_bucket",
                 "margin_cost_usd_total", "margin_requests_total", "margin_ledger_store_up",
                 "margin_gateway_overhead_seconds_bucket"):
        assert name in text, name
    assert 'team="metrics-team"' in text
    assert "secret-user" not in text
