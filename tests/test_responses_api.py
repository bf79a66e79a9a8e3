"""The OpenAI Responses API (/v1/responses) through the gateway: the official SDK, whole and
streamed, metered like chat (tokens by type, cost, tool calls), under the same key limits, cache,
routing and cascade checks; plus the pure readers of its shapes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from typing import Any

import httpx
import openai
import orjson
import pytest

from margin.config import ConfigError, parse_config
from margin.domain import responses
from margin.gateway.stream import relay
from margin.policy import agents, cascade
from margin.providers import make_provider
from margin.providers import responses_via_chat as via
from margin.providers.base import Chunk
from margin.providers.pool import PoolProvider
from margin.providers.responses_via_chat import ResponsesViaChat
from tests.conftest import Gateway, Mock, gateway_config, start_gateway, stop

D = Decimal
M = 1_000_000
TOOLS = [{"type": "function", "name": "lookup", "parameters": {"type": "object", "properties": {}}}]


@pytest.fixture(scope="module")
def gw(mock_upstream: Mock, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("responses")
    cfg = gateway_config(tmp, mock_upstream.url, f"sqlite:///{tmp}/l.db")
    cfg["cache"] = {"enabled": True}
    # the same mock, reached as a provider without /responses: margin translates to chat and back
    cfg["providers"].append({"name": "bridge", "kind": "openai", "base_url": mock_upstream.url, "responses_api": "chat",
                             "forward_headers": ["x-mock-*"]})
    cfg["models"].append({"name": "bridged", "provider": "bridge", "upstream_model": "gpt-4o-mini",
                          "price": {"genai_prices": "openai/gpt-4o-mini"}})
    cfg["groups"] = [{"name": "careful", "candidates": ["gpt-4o-mini", "gpt-4o"], "strategy": "cascade",
                      "verify_min_logprob": -0.5}]
    g = start_gateway(tmp, cfg)
    yield g
    assert g.proc is not None
    stop(g.proc)


def client(gw: Gateway, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url, api_key=key, max_retries=0)


def test_sdk_response_is_metered_like_chat(gw: Gateway, mock_upstream: Mock) -> None:
    k = gw.create_key(org="acme", team="search")
    raw = client(gw, k["key"]).responses.with_raw_response.create(
        model="gpt-4o-mini", input="one two three four five", max_output_tokens=8,
        extra_headers={"X-Margin-Run-Id": "run-r1", "X-Mock-Cached-Tokens": "4"})
    r = raw.parse()
    assert r.output_text and r.usage is not None
    assert (r.usage.input_tokens, r.usage.output_tokens) == (9, 8)  # 5 words + 4 per message, as chat
    assert raw.headers["x-margin-route"] == "gpt-4o-mini via mock (requested)"
    sent = mock_upstream.last_request()
    assert sent["max_output_tokens"] == 8 and "stream_options" not in sent and "max_tokens" not in sent
    [ev] = gw.events(k["key_id"], expect=1)
    assert ev["endpoint"] == "response" and ev["run_id"] == "run-r1" and ev["status"] == 200
    assert (ev["input_tokens"], ev["output_tokens"], ev["cached_input_tokens"]) == (9, 8, 4)
    assert ev["usage_source"] == "provider"
    assert D(ev["cost_usd"]) == D(5) * D("0.15") / M + D(4) * D("0.075") / M + D(8) * D("0.6") / M
    assert D(raw.headers["x-margin-cost-usd"]) == D(ev["cost_usd"])


def test_sdk_stream_is_relayed_and_metered(gw: Gateway, mock_upstream: Mock) -> None:
    k = gw.create_key(team="search")
    kinds, text, final = [], "", None
    with client(gw, k["key"]).responses.create(model="gpt-4o-mini", input=[
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "input_text", "text": "one two three"}]}],
            max_output_tokens=6, stream=True) as stream:
        for event in stream:
            kinds.append(event.type)
            if event.type == "response.output_text.delta":
                text += event.delta
            elif event.type in ("response.completed", "response.incomplete"):
                final = event.response
    assert kinds[0] == "response.created" and kinds[-1] == "response.incomplete"  # cut at 6 of 16 tokens
    assert final is not None and final.usage is not None and final.output_text == text
    assert "stream_options" not in mock_upstream.last_request()
    [ev] = gw.events(k["key_id"], expect=1)
    assert ev["endpoint"] == "response" and ev["stream"] == 1 and ev["status"] == 200
    assert (ev["input_tokens"], ev["output_tokens"]) == (final.usage.input_tokens, 6) == (13, 6)
    assert ev["usage_source"] == "provider" and ev["ttft_ms"] is not None


@pytest.mark.parametrize("stream", [False, True])
def test_function_calls_are_counted(gw: Gateway, stream: bool) -> None:
    k = gw.create_key(team="agents")
    r = httpx.post(gw.base_url + "/responses", timeout=30, headers={
        "Authorization": f"Bearer {k['key']}", "X-Mock-Tool-Calls": "2", "X-Margin-Run-Id": f"tools-{stream}"},
        json={"model": "gpt-4o-mini", "input": "look it up", "tools": TOOLS, "stream": stream})
    assert r.status_code == 200
    if not stream:
        assert [o["type"] for o in r.json()["output"]] == ["function_call", "function_call"]
    [ev] = gw.events(k["key_id"], expect=1)
    assert ev["tool_calls"] == 2 and ev["output_tokens"] > 0


def test_key_limits_use_max_output_tokens(gw: Gateway, mock_upstream: Mock) -> None:
    k = gw.create_key(team="capped", tags={"max_tokens": "5"})
    ok = httpx.post(gw.base_url + "/responses", timeout=30, headers={"Authorization": f"Bearer {k['key']}"},
                    json={"model": "gpt-4o-mini", "input": "hello"})
    assert ok.status_code == 200 and mock_upstream.last_request()["max_output_tokens"] == 5
    big = httpx.post(gw.base_url + "/responses", timeout=30, headers={"Authorization": f"Bearer {k['key']}"},
                     json={"model": "gpt-4o-mini", "input": "hello", "max_output_tokens": 50})
    err = big.json()["error"]
    assert big.status_code == 400 and err["param"] == "max_output_tokens"
    assert "'max_output_tokens' is 50; this key allows at most 5" in err["message"]


@pytest.mark.parametrize(("body", "param", "message"), [
    ({"model": "gpt-4o-mini"}, "input", "Missing required parameter: 'input'"),
    ({"model": "gpt-4o-mini", "input": []}, "input", "'input' must be a string or a non-empty array"),
    ({"model": "gpt-4o-mini", "input": ["hi"]}, "input[0]", "'input[0]' must be an input item object"),
    ({"model": "gpt-4o-mini", "input": "hi", "max_output_tokens": 0}, "max_output_tokens", "positive integer"),
])
def test_bad_requests_get_precise_errors(gw: Gateway, body: dict[str, Any], param: str, message: str) -> None:
    k = gw.create_key(team="t")
    r = httpx.post(gw.base_url + "/responses", json=body, timeout=30, headers={"Authorization": f"Bearer {k['key']}"})
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == param and message in err["message"], err


@pytest.mark.parametrize("stream", [False, True])
def test_exact_cache_serves_a_repeated_response(gw: Gateway, stream: bool) -> None:
    k = gw.create_key(team="cached")
    body = {"model": "gpt-4o-mini", "input": f"cache me {stream}", "temperature": 0, "stream": stream}
    first, second = (httpx.post(gw.base_url + "/responses", json=body, timeout=30,
                                headers={"Authorization": f"Bearer {k['key']}"}) for _ in range(2))
    assert first.status_code == second.status_code == 200
    if stream:  # the replay is the same events; margin's cost comment may differ
        def events(r: httpx.Response) -> list[str]:
            return [line for line in r.text.splitlines() if line and not line.startswith(":")]

        assert events(first) == events(second) and events(first)[-2] == "event: response.completed"
    else:
        assert first.json() == second.json()
    rows = sorted(gw.events(k["key_id"], expect=2), key=lambda e: e["ts_start"])
    assert [r["cache_hit"] for r in rows] == [None, "exact"] and D(rows[1]["cost_usd"]) == 0


def test_cascade_verifies_response_logprobs(gw: Gateway) -> None:
    k = gw.create_key(team="careful")

    def ask(logprob: str) -> httpx.Response:
        return httpx.post(gw.base_url + "/responses", timeout=30, json={"model": "careful", "input": "What is 2+2?"},
                          headers={"Authorization": f"Bearer {k['key']}", "X-Mock-Logprob": logprob})

    sure = ask("-0.1")
    assert sure.status_code == 200 and sure.headers["x-margin-route"].startswith("gpt-4o-mini")
    assert "logprobs" not in sure.json()["output"][0]["content"][0]  # asked for verification only
    unsure = ask("-1.2")
    assert unsure.status_code == 200 and unsure.headers["x-margin-route"].startswith("gpt-4o ")
    rows = gw.events(k["key_id"], expect=3)
    assert any("cascade_escalate" in (r["actions"] or "") and r["model"] == "gpt-4o-mini" for r in rows)


# -- pure ----------------------------------------------------------------------------------------------

def test_input_items_read_as_chat_messages() -> None:
    payload = {"instructions": "be brief", "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "hi"}, {"type": "input_image", "image_url": "x"}]},
        {"type": "function_call", "name": "lookup", "arguments": "{}", "call_id": "c1"},
        {"type": "function_call_output", "call_id": "c1", "output": "42"},
        {"type": "reasoning", "summary": []}]}
    assert responses.as_messages(payload) == [
        {"role": "developer", "content": "be brief"}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "lookup({})"}, {"role": "tool", "content": "42"}]
    assert responses.as_messages({"input": "plain"}) == [{"role": "user", "content": "plain"}]
    # loop detection hashes the newest item, not the growing list
    a = {"input": [{"role": "user", "content": "x"}, {"type": "function_call_output", "output": "same"}]}
    b = {"input": [{"role": "user", "content": "y"}, {"type": "function_call_output", "output": "same"}]}
    assert agents.message_hash("response", a) == agents.message_hash("response", b)


def test_response_logprobs_are_asked_read_and_removed() -> None:
    payload: dict[str, Any] = {"include": ["reasoning.encrypted_content"]}
    assert cascade.ask_logprobs("response", payload)
    assert payload["include"] == ["reasoning.encrypted_content", "message.output_text.logprobs"]
    assert not cascade.ask_logprobs("response", payload)  # the client's own request is left as it is
    lps = [{"token": "a", "logprob": -0.5}, {"token": "b", "logprob": -1.5}]
    data = {"object": "response", "output": [{"type": "message", "content": [
        {"type": "output_text", "text": "ab", "logprobs": lps}]}]}
    assert cascade.token_logprobs(data) == [-0.5, -1.5]
    assert "logprobs" not in cascade.without_logprobs(data)["output"][0]["content"][0]


def test_providers_without_responses_get_them_through_chat() -> None:
    cfg = parse_config({
        "providers": [{"name": "cloud", "kind": "openai", "base_url": "http://127.0.0.1:1/v1"},
                      {"name": "compat", "kind": "openai", "base_url": "http://127.0.0.1:1/v1",
                       "responses_api": "chat"},
                      {"name": "local", "kind": "llamacpp-server", "base_url": "http://127.0.0.1:2/v1"},
                      {"name": "gpu", "kind": "vllm", "base_url": "http://127.0.0.1:3/v1"}],
        "models": [{"name": "m", "provider": "cloud", "price": {"genai_prices": "openai/gpt-4o-mini"}}]})
    made = {p.name: make_provider(p) for p in cfg.providers}
    assert not isinstance(made["cloud"], ResponsesViaChat) and isinstance(made["compat"], ResponsesViaChat)
    assert isinstance(made["local"], PoolProvider) and isinstance(made["gpu"], PoolProvider)
    assert isinstance(made["local"].replicas[0].http, ResponsesViaChat)  # llama-server has no /responses
    assert not isinstance(made["gpu"].replicas[0].http, ResponsesViaChat)  # vLLM has
    with pytest.raises(ConfigError, match="no /responses of its own"):
        parse_config({"providers": [{"name": "x", "kind": "llamacpp", "model_path": "m.gguf",
                                     "responses_api": "native"}], "models": []})


def test_relay_reads_a_response_stream() -> None:
    def ev(kind: str, **f: Any) -> Chunk:
        data = {"type": kind, **f}
        return Chunk(b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n", data)

    usage = {"input_tokens": 7, "output_tokens": 3, "input_tokens_details": {"cached_tokens": 2},
             "output_tokens_details": {"reasoning_tokens": 1}, "total_tokens": 10}
    chunks = [ev("response.created", response={"usage": None}), ev("response.output_text.delta", delta="he"),
              ev("response.output_text.delta", delta="llo"),
              ev("response.output_item.added", item={"type": "function_call", "name": "f"}),
              ev("response.completed", response={"usage": usage}), Chunk(b"", None)]

    class Sink:
        def __init__(self) -> None:
            self.disconnected = False
            self.sent: list[bytes] = []

        async def chunk(self, data: bytes) -> None:
            self.sent.append(data)

    async def gen() -> AsyncIterator[Chunk]:
        for c in chunks[1:]:
            yield c

    async def done(_: Any) -> bytes:
        return b": margin cost\n\n"

    sink = Sink()
    r = asyncio.run(relay(gen(), chunks[0], sink, True, done))
    assert r.failure is None and r.usage is not None
    assert (r.usage.input_tokens, r.usage.output_tokens, r.usage.cached_input_tokens, r.usage.reasoning_tokens) == (
        7, 3, 2, 1)
    assert "".join(r.pieces) == "hellof" and r.tool_calls == 1 and not r.upstream_error_event
    assert sink.sent[0].startswith(b"event: response.created\n") and sink.sent[-1] == b": margin cost\n\n"


# -- through chat (providers without /responses) ---------------------------------------------------

def test_bridged_response_is_translated_both_ways(gw: Gateway, mock_upstream: Mock) -> None:
    k = gw.create_key(team="bridge")
    raw = client(gw, k["key"]).responses.with_raw_response.create(
        model="bridged", instructions="be brief", input="one two three four five", max_output_tokens=8,
        text={"format": {"type": "json_schema", "name": "a", "schema": {"type": "object"}}},
        extra_headers={"X-Mock-Cached-Tokens": "4"})
    r = raw.parse()
    sent = mock_upstream.last_request()
    assert sent["messages"] == [{"role": "system", "content": "be brief"},
                                {"role": "user", "content": "one two three four five"}]
    assert sent["max_tokens"] == 8 and sent["response_format"]["type"] == "json_schema" and "input" not in sent
    assert r.object == "response" and r.status == "incomplete" and r.output_text  # 8 of the mock's 12 tokens
    assert r.usage is not None and (r.usage.input_tokens, r.usage.output_tokens) == (15, 8)
    assert r.usage.input_tokens_details.cached_tokens == 4
    [ev] = gw.events(k["key_id"], expect=1)
    assert ev["endpoint"] == "response" and (ev["input_tokens"], ev["output_tokens"], ev["cached_input_tokens"]) == (
        15, 8, 4) and ev["provider"] == "bridge"


def test_bridged_stream_with_function_calls(gw: Gateway, mock_upstream: Mock) -> None:
    k = gw.create_key(team="bridge-stream")
    c = client(gw, k["key"])
    with c.responses.create(model="bridged", input="hello there", max_output_tokens=5, stream=True) as stream:
        events = list(stream)
    kinds = [e.type for e in events]
    assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert kinds[-1] == "response.incomplete" and kinds.count("response.output_text.delta") == 5
    assert mock_upstream.last_request()["stream_options"] == {"include_usage": True}
    final = events[-1].response  # type: ignore[union-attr]
    assert final.output_text == "".join(e.delta for e in events if e.type == "response.output_text.delta")
    with c.responses.create(model="bridged", input="look it up", tools=TOOLS, stream=True,  # type: ignore[arg-type]
                            extra_headers={"X-Mock-Tool-Calls": "2"}) as stream:
        events = list(stream)
    done = events[-1].response  # type: ignore[union-attr]
    assert [o.type for o in done.output] == ["function_call", "function_call"]
    assert all(o.name == "lookup" and o.arguments.startswith("{") for o in done.output)  # type: ignore[union-attr]
    assert mock_upstream.last_request()["tools"][0] == {"type": "function", "function": {
        "name": "lookup", "parameters": {"type": "object", "properties": {}}}}
    rows = sorted(gw.events(k["key_id"], expect=2), key=lambda e: e["ts_start"])
    assert rows[0]["output_tokens"] == 5 and rows[1]["tool_calls"] == 2


@pytest.mark.parametrize(("extra", "message"), [
    ({"previous_response_id": "resp_1"}, "cannot carry 'previous_response_id' (stored responses)"),
    ({"tools": [{"type": "web_search"}]}, "cannot carry the built-in tool 'web_search'"),
])
def test_what_chat_cannot_carry_is_a_precise_400(gw: Gateway, extra: dict[str, Any], message: str) -> None:
    k = gw.create_key(team="t")
    r = httpx.post(gw.base_url + "/responses", timeout=30, headers={"Authorization": f"Bearer {k['key']}"},
                   json={"model": "bridged", "input": "hi", **extra})
    assert r.status_code == 400 and message in r.json()["error"]["message"], r.text
    assert "provider bridge serves the Responses API through chat completions" in r.json()["error"]["message"]


def test_input_items_become_chat_turns() -> None:
    payload = {"model": "m", "input": [
        {"role": "developer", "content": "rules"},
        {"role": "user", "content": [{"type": "input_text", "text": "see"}, {"type": "input_image", "image_url": "u"}]},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        {"type": "function_call", "call_id": "c2", "name": "g", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "1"},
        {"type": "reasoning", "summary": []},
        {"role": "assistant", "content": [{"type": "output_text", "text": "done"}]}],
        "tool_choice": {"type": "function", "name": "f"}, "reasoning": {"effort": "low"},
        "include": ["message.output_text.logprobs"], "stream": True}
    chat = via.to_chat("p", payload)
    assert chat["messages"] == [
        {"role": "system", "content": "rules"},
        {"role": "user", "content": [{"type": "text", "text": "see"},
                                     {"type": "image_url", "image_url": {"url": "u", "detail": "auto"}}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}},
            {"id": "c2", "type": "function", "function": {"name": "g", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "1"},
        {"role": "assistant", "content": "done"}]
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "f"}}
    assert chat["reasoning_effort"] == "low" and chat["logprobs"] is True
    assert chat["stream_options"] == {"include_usage": True}


def test_chat_answers_become_responses() -> None:
    data = {"id": "x1", "model": "m", "created": 5, "choices": [{"finish_reason": "tool_calls", "message": {
        "role": "assistant", "content": "ok", "tool_calls": [
            {"id": "c9", "type": "function", "function": {"name": "f", "arguments": "{\"a\":1}"}}]},
        "logprobs": {"content": [{"token": "ok", "logprob": -0.2}]}}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 4, "total_tokens": 14,
                  "prompt_tokens_details": {"cached_tokens": 3}, "completion_tokens_details": {"reasoning_tokens": 1}}}
    r = via.from_chat({"model": "m", "instructions": "i"}, data)
    assert (r["id"], r["object"], r["status"], r["created_at"], r["instructions"]) == (
        "resp_x1", "response", "completed", 5, "i")
    assert responses.output_text(r) == "okf{\"a\":1}" and responses.tool_calls(r) == 1
    assert cascade.token_logprobs(r) == [-0.2]
    assert r["usage"] == {"input_tokens": 10, "input_tokens_details": {"cached_tokens": 3}, "output_tokens": 4,
                          "output_tokens_details": {"reasoning_tokens": 1}, "total_tokens": 14}
    short = via.from_chat({}, {"choices": [{"finish_reason": "length", "message": {"content": "cut"}}]})
    assert short["status"] == "incomplete" and short["incomplete_details"] == {"reason": "max_output_tokens"}


def test_stream_converter_sequences_events() -> None:
    conv = via.StreamConverter({"model": "m"})
    chunks = [{"id": "s1", "model": "m", "choices": [{"delta": {"role": "assistant", "content": "he"}}]},
              {"id": "s1", "choices": [{"delta": {"content": "y"}}]},
              {"id": "s1", "choices": [{"delta": {"tool_calls": [{"index": 0, "id": "c1", "function": {
                  "name": "f", "arguments": "{\"a\""}}]}}]},
              {"id": "s1", "choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": ":1}"}}]},
                                        "finish_reason": "tool_calls"}]},
              {"id": "s1", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}]
    events = [c.data for d in chunks for c in conv.feed(d)] + [c.data for c in conv.close()]
    assert all(e is not None for e in events)
    kinds = [e["type"] for e in events if e]
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added", "response.output_text.delta", "response.output_text.delta",
                     "response.output_item.added", "response.function_call_arguments.delta",
                     "response.function_call_arguments.delta", "response.output_text.done",
                     "response.content_part.done", "response.function_call_arguments.done",
                     "response.output_item.done", "response.output_item.done", "response.completed"]
    assert [e["sequence_number"] for e in events if e] == list(range(len(kinds)))
    final = events[-1]["response"]  # type: ignore[index]
    assert responses.output_text(final) == "heyf{\"a\":1}" and final["usage"]["output_tokens"] == 2


def test_a_broken_stream_ends_with_an_error_event(gw: Gateway) -> None:
    k = gw.create_key(team="broken")
    with httpx.stream("POST", gw.base_url + "/responses", timeout=30, json={
            "model": "gpt-4o-mini", "input": "cut me off", "stream": True},
            headers={"Authorization": f"Bearer {k['key']}", "X-Mock-Reset": "1"}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[0] == "event: response.created" and lines[-2] == "event: error"
    err = orjson.loads(lines[-1].removeprefix("data: "))
    assert err["type"] == "error" and err["code"] == "upstream_connection_error"
    [ev] = gw.events(k["key_id"], expect=1)
    assert ev["status"] == 502 and ev["usage_source"] == "estimated" and ev["output_tokens"] > 0


# -- review fixes ---------------------------------------------------------------------------------------

def test_chat_translation_refuses_what_it_would_drop() -> None:
    tool_image = {"input": [{"type": "function_call_output", "call_id": "c", "output": [
        {"type": "input_image", "image_url": "u"}]}]}
    for payload, what in [(tool_image, "images in an assistant turn or a tool output"),
                          ({"input": "x", "prompt": {"id": "pmpt_1"}}, "'prompt'"),
                          ({"input": "x", "max_tool_calls": 3}, "'max_tool_calls'"),
                          ({"input": "x", "tool_choice": {"type": "allowed_tools", "tools": []}},
                           "a tool_choice of type 'allowed_tools'")]:
        with pytest.raises(via.Unsupported, match=what):
            via.to_chat("p", payload)
    assert "parallel_tool_calls" not in via.to_chat("p", {"input": "x", "parallel_tool_calls": True})


def test_chat_usage_keeps_every_providers_cache_fields() -> None:
    anthropic_style = {"prompt_tokens": 20, "completion_tokens": 5, "cache_read_input_tokens": 80,
                       "cache_creation_input_tokens": 10}
    u = via.usage(anthropic_style)
    assert u is not None and (u["input_tokens"], u["output_tokens"]) == (110, 5)
    assert u["input_tokens_details"] == {"cached_tokens": 80, "cache_write_tokens": 10}
    from margin.providers.usage import parse_usage

    metered = parse_usage({"usage": u})  # what the gateway meters from the translated answer
    assert metered is not None
    assert (metered.input_tokens, metered.cached_input_tokens, metered.cache_write_tokens) == (110, 80, 10)


def test_reasoning_and_content_filter_come_through() -> None:
    whole = via.from_chat({}, {"id": "r", "choices": [{"finish_reason": "content_filter", "message": {
        "content": "partial", "reasoning_content": "thinking"}}]})
    assert [o["type"] for o in whole["output"]] == ["reasoning", "message"]
    assert whole["status"] == "incomplete" and whole["incomplete_details"] == {"reason": "content_filter"}
    conv = via.StreamConverter({})
    events = [c.data for d in ({"id": "s", "choices": [{"delta": {"reasoning_content": "hm"}}]},
                               {"id": "s", "choices": [{"delta": {"content": "ok"}, "finish_reason": "stop"}]})
              for c in conv.feed(d)] + [c.data for c in conv.close()]
    kinds = [e["type"] for e in events if e]
    assert "response.reasoning_text.delta" in kinds and kinds[-1] == "response.completed"
    final = events[-1]["response"]  # type: ignore[index]
    assert [o["type"] for o in final["output"]] == ["reasoning", "message"]
    assert "".join(responses.event_text(e) for e in events if e) == "hmok"  # what the relay bills


def test_background_is_refused_with_a_way_out(gw: Gateway) -> None:
    k = gw.create_key(team="t")
    r = httpx.post(gw.base_url + "/responses", timeout=30, headers={"Authorization": f"Bearer {k['key']}"},
                   json={"model": "gpt-4o-mini", "input": "later", "background": True})
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "background" and "X-Margin-Priority: low" in err["message"]


def test_whether_a_response_was_stored_is_part_of_its_cache_key() -> None:
    from margin.policy.cache import cache_key

    def key(endpoint: str, store: bool) -> str:
        return cache_key(endpoint, "m", {"input": "q", "messages": [], "store": store}, "t")

    assert key("response", True) != key("response", False)
    assert key("chat", True) == key("chat", False)


def test_stateful_responses_calls_route_to_providers_that_keep_state() -> None:
    from margin.domain import Attribution, Call
    from margin.gateway.calls import needed_capabilities
    from margin.policy import route
    from margin.pricing import PriceBook
    from margin.wiring import targets

    cfg = parse_config({
        "providers": [{"name": "cloud", "kind": "openai", "base_url": "http://127.0.0.1:1/v1"},
                      {"name": "local", "kind": "llamacpp-server", "base_url": "http://127.0.0.1:2/v1"}],
        "models": [{"name": "cloud-m", "provider": "cloud", "price": {"genai_prices": "openai/gpt-4o-mini"}},
                   {"name": "local-m", "provider": "local", "price": {"per_million": {"input": "0", "output": "0"}}}],
        "groups": [{"name": "cheap", "candidates": ["local-m", "cloud-m"], "strategy": "cheapest"}]})
    t = targets(cfg.models, cfg.providers, PriceBook(cfg.models))
    groups = {"cheap": route.Group("cheap", ("local-m", "cloud-m"), "cheapest")}
    call = Call(endpoint="response", requested_model="cheap", stream=False, attribution=Attribution())

    def served(payload: dict[str, Any]) -> str:
        d = route.decide(call, t, (), groups, route.Need(10, 10, needed_capabilities(payload)))
        assert isinstance(d, route.RouteDecision), d
        return d.model

    assert served({"input": "hi"}) == "local-m"  # free, and chat carries it
    assert served({"input": "hi", "previous_response_id": "resp_1"}) == "cloud-m"
    assert served({"input": "hi", "tools": [{"type": "web_search"}]}) == "cloud-m"


def test_pools_read_responses_usage() -> None:
    from margin.providers.pool import _usage

    assert _usage({"object": "response", "usage": {"input_tokens": 3, "output_tokens": 2}}) == (3, 2)
    assert _usage({"type": "response.completed", "response": {"usage": {"input_tokens": 4, "output_tokens": 1}}}) == (
        4, 1)
    assert _usage({"usage": {"prompt_tokens": 5, "completion_tokens": 6}}) == (5, 6)


def test_an_error_event_ends_a_responses_stream() -> None:
    """Nothing follows an `error` event: the stream ends there, not at a timeout or a reset."""
    from aiohttp import web
    from aiohttp.test_utils import TestServer

    from margin.config import ProviderConfig
    from margin.providers.openai_http import OpenAIHTTPProvider

    release = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b'event: response.created\ndata: {"type":"response.created","response":{}}\n\n')
        await resp.write(b'event: error\ndata: {"type":"error","code":"server_error","message":"boom"}\n\n')
        await asyncio.wait_for(release.wait(), 5)  # the connection stays open after the error
        return resp

    async def run() -> list[Chunk]:
        app = web.Application()
        app.router.add_post("/v1/responses", handler)
        server = TestServer(app)
        await server.start_server()
        p = OpenAIHTTPProvider(ProviderConfig(name="x", kind="openai", base_url=str(server.make_url("/v1")),
                                              timeout_s=3))
        await p.start()
        try:
            return [c async for c in p.stream("response", {"model": "m", "input": "x", "stream": True})]
        finally:
            release.set()
            await p.close()
            await server.close()

    chunks = asyncio.run(run())
    assert [c.data["type"] if c.data else None for c in chunks] == ["response.created", "error", None]
    assert chunks[1].raw.startswith(b"event: error\n")


def test_every_client_run_call_is_a_tool_call() -> None:
    data = {"object": "response", "output": [
        {"type": "function_call"}, {"type": "custom_tool_call"}, {"type": "computer_call"},
        {"type": "web_search_call"}, {"type": "mcp_call"}, {"type": "message", "content": []}]}
    assert responses.tool_calls(data) == 3  # web search and MCP run at the provider, not as agent steps
    assert responses.event_tool_call({"type": "response.output_item.added", "item": {"type": "custom_tool_call"}})
    assert not responses.event_tool_call({"type": "response.output_item.added", "item": {"type": "mcp_call"}})


def test_a_fallback_that_cannot_serve_the_call_is_skipped() -> None:
    from margin.domain import Attribution, Call
    from margin.policy import route

    t = {"cloud": route.Target("cloud", "p1", "c", capabilities=frozenset({"tools", "json", route.RESPONSES_STATE}),
                               fallbacks=("local", "cloud2")),
         "local": route.Target("local", "p2", "l"),
         "cloud2": route.Target("cloud2", "p3", "c2", capabilities=frozenset({"tools", "json", route.RESPONSES_STATE}))}
    call = Call(endpoint="response", requested_model="cloud", stream=False, attribution=Attribution())
    stateful = route.decide(call, t, (), need=route.Need(capabilities=frozenset({route.RESPONSES_STATE})))
    plain = route.decide(call, t, ())
    assert isinstance(stateful, route.RouteDecision) and stateful.fallbacks == ("cloud2",)
    assert isinstance(plain, route.RouteDecision) and plain.fallbacks == ("local", "cloud2")
