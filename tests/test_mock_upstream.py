"""The mock upstream, checked through the official openai SDK (the client the gateway must satisfy)."""

from __future__ import annotations

import base64
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import orjson
import pytest

from margin.providers.mock_upstream import MockOptions, start_mock

MESSAGES: list[Any] = [
    {"role": "system", "content": "you are terse"},
    {"role": "user", "content": "hello there how are you"},
]
PROMPT_TOKENS = (3 + 4) + (5 + 4)  # words + 4 per message


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def base() -> Iterator[str]:
    port = _free_port()
    code = (
        "from margin.providers.mock_upstream import serve, MockOptions;"
        f"serve('127.0.0.1', {port}, MockOptions())"
    )
    proc = subprocess.Popen([sys.executable, "-c", code])
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=0.5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, "mock upstream exited"
            assert time.monotonic() < deadline, "mock upstream did not start"
            time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        proc.wait(5)


@pytest.fixture(scope="module")
def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="sk-test", max_retries=0)


def _chat(client: openai.OpenAI, **kw: Any) -> Any:
    args: dict[str, Any] = {"model": "gpt-4o-mini", "messages": MESSAGES, **kw}
    return client.chat.completions.create(**args)


def test_chat_non_streaming(client: openai.OpenAI) -> None:
    r = _chat(client)
    assert r.model == "gpt-4o-mini"
    assert r.object == "chat.completion"
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.role == "assistant"
    assert len((r.choices[0].message.content or "").split()) == 16
    u = r.usage
    assert u is not None
    assert (u.prompt_tokens, u.completion_tokens, u.total_tokens) == (PROMPT_TOKENS, 16, PROMPT_TOKENS + 16)
    assert u.prompt_tokens_details is not None and u.prompt_tokens_details.cached_tokens == 0
    assert u.completion_tokens_details is not None and u.completion_tokens_details.reasoning_tokens == 0


def test_chat_is_deterministic_and_max_tokens_truncates(client: openai.OpenAI) -> None:
    a = _chat(client).choices[0].message.content
    assert _chat(client).choices[0].message.content == a
    assert _chat(client, model="other-model").choices[0].message.content != a
    short = _chat(client, max_tokens=5)
    assert short.choices[0].finish_reason == "length"
    assert short.usage is not None and short.usage.completion_tokens == 5
    assert a is not None and a.startswith(short.choices[0].message.content or "-")
    assert _chat(client, max_completion_tokens=3).usage.completion_tokens == 3


def test_chat_streaming_with_usage(client: openai.OpenAI) -> None:
    chunks = list(_chat(client, stream=True, stream_options={"include_usage": True}))
    content = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert all(c.model == "gpt-4o-mini" and c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == "stop"
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert len(content) == last.usage.completion_tokens == 16
    assert last.usage.prompt_tokens == PROMPT_TOKENS
    assert all(c.usage is None for c in chunks[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in content)
    assert text == _chat(client).choices[0].message.content


def test_chat_streaming_without_include_usage_has_no_usage(client: openai.OpenAI) -> None:
    chunks = list(_chat(client, stream=True))
    assert all(c.usage is None for c in chunks)
    assert all(c.choices for c in chunks)
    assert sum(1 for c in chunks if c.choices[0].delta.content) == 16


def test_completions(client: openai.OpenAI) -> None:
    r = client.completions.create(model="davinci-x", prompt="one two three", max_tokens=4)
    assert r.model == "davinci-x" and r.object == "text_completion"
    assert r.usage is not None and (r.usage.prompt_tokens, r.usage.completion_tokens) == (3, 4)
    chunks = list(
        client.completions.create(
            model="davinci-x",
            prompt="one two three",
            max_tokens=4,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens == 7


def test_embeddings(client: openai.OpenAI, base: str) -> None:
    one = client.embeddings.create(model="text-embedding-3-small", input="some text", encoding_format="float")
    assert len(one.data) == 1 and len(one.data[0].embedding) == 8
    many = client.embeddings.create(
        model="text-embedding-3-small", input=["some text", "b"], encoding_format="float"
    )
    assert [d.index for d in many.data] == [0, 1]
    assert many.data[0].embedding == one.data[0].embedding != many.data[1].embedding
    assert many.usage.prompt_tokens == 3 and many.model == "text-embedding-3-small"
    raw = httpx.post(
        f"{base}/v1/embeddings",
        json={
            "model": "text-embedding-3-small",
            "input": "some text",
            "encoding_format": "base64",
            "dimensions": 4,
        },
    ).json()
    vec = struct.unpack("<4f", base64.b64decode(raw["data"][0]["embedding"]))
    assert abs(sum(x * x for x in vec) - 1.0) < 1e-5


def test_models_health_and_last_request(client: openai.OpenAI, base: str) -> None:
    assert "gpt-4o-mini" in [m.id for m in client.models.list()]
    assert httpx.get(f"{base}/health").json() == {"status": "ok"}
    _chat(client, model="rewritten", stream=True, stream_options={"include_usage": True}).close()
    last = httpx.get(f"{base}/mock/last_request").json()
    assert last["model"] == "rewritten" and last["stream_options"] == {"include_usage": True}


def test_error_status_headers(client: openai.OpenAI) -> None:
    with pytest.raises(openai.InternalServerError) as e503:
        _chat(client, extra_headers={"X-Mock-Status": "503"})
    assert e503.value.status_code == 503
    assert isinstance(e503.value.body, dict) and e503.value.body["type"] == "server_error"
    with pytest.raises(openai.RateLimitError) as e429:
        _chat(client, extra_headers={"X-Mock-Status": "429"})
    assert isinstance(e429.value.body, dict) and e429.value.body["code"] == "rate_limit_exceeded"


def test_usage_headers(client: openai.OpenAI) -> None:
    r = _chat(
        client,
        extra_headers={
            "X-Mock-Output-Tokens": "3",
            "X-Mock-Cached-Tokens": "5",
            "X-Mock-Reasoning-Tokens": "7",
        },
    )
    u = r.usage
    assert u is not None and len((r.choices[0].message.content or "").split()) == 3
    assert (u.completion_tokens, u.total_tokens) == (10, PROMPT_TOKENS + 10)
    assert u.prompt_tokens_details is not None and u.prompt_tokens_details.cached_tokens == 5
    assert u.completion_tokens_details is not None and u.completion_tokens_details.reasoning_tokens == 7
    assert _chat(client, extra_headers={"X-Mock-Usage": "0"}).usage is None
    chunks = list(
        _chat(
            client, stream=True, stream_options={"include_usage": True}, extra_headers={"X-Mock-Usage": "0"}
        )
    )
    assert all(c.usage is None for c in chunks)


def test_ttft_hang_and_reset_headers(client: openai.OpenAI) -> None:
    t0 = time.perf_counter()
    _chat(client, extra_headers={"X-Mock-Ttft-Ms": "150"})
    assert time.perf_counter() - t0 >= 0.15
    with pytest.raises(openai.APITimeoutError):
        _chat(client, extra_headers={"X-Mock-Hang": "1"}, timeout=0.2)
    with pytest.raises(openai.APIConnectionError):
        _chat(client, extra_headers={"X-Mock-Reset": "1"})
    got: list[str] = []
    with pytest.raises((httpx.HTTPError, openai.APIError)):
        for c in _chat(client, stream=True, extra_headers={"X-Mock-Reset": "1"}):
            got.append(c.choices[0].delta.content or "")
    assert len(got) == 8  # half of 16, then the connection is dropped


def test_invalid_json(base: str) -> None:
    bad = httpx.post(f"{base}/v1/chat/completions", content=b"{nope")
    assert bad.status_code == 400
    assert set(bad.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.post(
        f"{base}/v1/chat/completions",
        json={"model": "m", "messages": MESSAGES},
        headers={"X-Mock-Invalid-Json": "1"},
    )
    assert r.status_code == 200
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(r.content)


async def test_in_process_async_client_and_options() -> None:
    mock = await start_mock(options=MockOptions(usage=False, output_tokens=4, models="a,b", seed=3))
    try:
        ac = openai.AsyncOpenAI(base_url=mock.base_url, api_key="x", max_retries=0)
        r = await ac.chat.completions.create(model="m", messages=MESSAGES)
        assert r.usage is None and len((r.choices[0].message.content or "").split()) == 4
        stream = await ac.chat.completions.create(
            model="m", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
        assert all([c.usage is None async for c in stream])
        assert [m.id async for m in ac.models.list()] == ["a", "b"]
        assert mock.app.requests == 2
        await ac.close()
    finally:
        await mock.close()


async def _statuses(options: MockOptions, n: int) -> list[int]:
    mock = await start_mock(options=options)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{mock.port}") as hc:
            body = {"model": "m", "messages": MESSAGES}
            return [(await hc.post("/v1/chat/completions", json=body)).status_code for _ in range(n)]
    finally:
        await mock.close()


async def test_error_rate_is_reproducible() -> None:
    opts = MockOptions(error_rate=0.5, seed=7)
    first = await _statuses(opts, 30)
    assert set(first) == {200, 500}
    assert await _statuses(opts, 30) == first


async def test_cached_fraction_and_reasoning_options() -> None:
    mock = await start_mock(options=MockOptions(cached_fraction=0.5, reasoning_tokens=2, output_tokens=3))
    try:
        ac = openai.AsyncOpenAI(base_url=mock.base_url, api_key="x", max_retries=0)
        u = (await ac.chat.completions.create(model="m", messages=MESSAGES)).usage
        assert u is not None and u.completion_tokens == 5
        assert (
            u.prompt_tokens_details is not None
            and u.prompt_tokens_details.cached_tokens == PROMPT_TOKENS // 2
        )
        await ac.close()
    finally:
        await mock.close()


def test_options_validation() -> None:
    with pytest.raises(ValueError):
        MockOptions(error_rate=1.5)
    with pytest.raises(ValueError):
        MockOptions(output_tokens=-1)


async def test_reset_rate_drops_streams_only() -> None:
    mock = await start_mock(options=MockOptions(reset_rate=1.0, output_tokens=6))
    try:
        ac = openai.AsyncOpenAI(base_url=mock.base_url, api_key="x", max_retries=0)
        r = await ac.chat.completions.create(model="m", messages=MESSAGES)  # non-streaming: unaffected
        assert r.usage is not None and r.usage.completion_tokens == 6
        got = 0
        with pytest.raises((httpx.HTTPError, openai.APIError)):
            async for _ in await ac.chat.completions.create(model="m", messages=MESSAGES, stream=True):
                got += 1
        assert got == 3
        await ac.close()
    finally:
        await mock.close()
