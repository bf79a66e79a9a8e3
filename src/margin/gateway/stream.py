"""Relay an upstream SSE stream to the client while metering it.

Usage is taken from any chunk that carries it (OpenAI sends it on a final chunk with no choices;
DeepSeek on the last content chunk; vLLM can send it on every chunk) and hidden from clients
that did not ask for it; a Responses API stream carries it in its terminal event's response.
Whatever ends the stream - [DONE] (or a terminal response event), a reset, an error event, the
client leaving, a bug - what was delivered is known, so it can be billed."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from margin.domain import Usage, responses
from margin.providers.base import Chunk, UpstreamConnectionError, UpstreamError, UpstreamTimeout
from margin.providers.usage import parse_usage

log = logging.getLogger("margin.gateway")
UPSTREAM_ERRORS = (UpstreamError, UpstreamTimeout, UpstreamConnectionError)


class Sink(Protocol):
    @property
    def disconnected(self) -> bool: ...

    async def chunk(self, data: bytes) -> None: ...


Headers = list[tuple[bytes, bytes]]


class Out(Protocol):
    """How the pipeline answers; the ASGI shell implements it."""

    disconnected: bool
    started: bool

    async def respond(self, status: int, headers: Headers, body: bytes) -> None: ...

    async def start(self, status: int, headers: Headers) -> None: ...

    async def chunk(self, data: bytes) -> None: ...


class Captured:
    """An Out that keeps a non-streamed answer instead of sending it: for calls margin makes on
    its own account (compression summaries, the batch lane) through the same pipeline."""

    def __init__(self) -> None:
        self.disconnected = False
        self.started = False
        self.status = 0
        self.headers: Headers = []
        self.body = b""

    async def respond(self, status: int, headers: Headers, body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    async def start(self, status: int, headers: Headers) -> None:
        raise RuntimeError("Captured answers are not streamed")

    async def chunk(self, data: bytes) -> None:
        self.body += data


@dataclass(slots=True)
class Relayed:
    usage: Usage | None = None
    pieces: list[str] = field(default_factory=list)  # delivered text, for estimates
    n_out: int = 0  # chunks that carried output
    tool_calls: int = 0  # tool calls the answer issued (each starts with a delta carrying its id)
    t_first: float = 0.0
    t_last: float = 0.0
    failure: BaseException | None = None  # what cut the stream short, if anything
    upstream_error_event: bool = False  # the upstream sent {"error": ...} inside the stream
    client_left: bool = False


def delta_text(data: dict[str, Any]) -> str:
    if responses.is_event(data):
        return responses.event_text(data)
    parts: list[str] = []
    for c in data.get("choices") or ():
        if not isinstance(c, dict):
            continue
        if isinstance(c.get("text"), str):
            parts.append(c["text"])
        d = c.get("delta")
        if isinstance(d, dict):
            for k in ("content", "reasoning_content"):
                if isinstance(d.get(k), str):
                    parts.append(d[k])
            for tc in d.get("tool_calls") or ():
                fn = tc.get("function") if isinstance(tc, dict) else None
                if isinstance(fn, dict):
                    parts.append(str(fn.get("name") or "") + str(fn.get("arguments") or ""))
    return "".join(parts)


def _new_tool_calls(data: dict[str, Any]) -> int:
    n = 0
    for c in data.get("choices") or ():
        d = c.get("delta") if isinstance(c, dict) else None
        if isinstance(d, dict):
            n += sum(1 for tc in d.get("tool_calls") or () if isinstance(tc, dict) and tc.get("id"))
    return n


async def relay(chunks: AsyncIterator[Chunk], first: Chunk, out: Sink, client_wants_usage: bool,
                on_done: Any) -> Relayed:
    """Forward chunks until [DONE] or a failure. `on_done(r)` runs just before [DONE] is sent
    and returns bytes to send first (margin's cost comment)."""
    r = Relayed()
    chunk: Chunk | None = first
    try:
        while chunk is not None:
            data, raw = chunk.data, chunk.raw
            if data is None:
                await out.chunk(await on_done(r))
            else:
                if data.get("usage"):
                    r.usage = parse_usage(data) or r.usage
                    if not client_wants_usage:
                        if not data.get("choices"):
                            raw = b""
                        else:  # usage riding on a content chunk: strip it, keep the content
                            raw = b"data: " + orjson.dumps({k: v for k, v in data.items() if k != "usage"}) + b"\n\n"
                elif (resp := responses.event_response(data)) is not None and resp.get("usage"):
                    r.usage = parse_usage(resp) or r.usage  # a Responses stream's usage: its final event
                if ("error" in data and not data.get("choices")) or responses.event_failed(data):
                    r.upstream_error_event = True
                text = delta_text(data)
                if text and b'"tool_calls"' in chunk.raw:  # cheap test before walking the JSON
                    r.tool_calls += _new_tool_calls(data)
                elif text and responses.event_tool_call(data):
                    r.tool_calls += 1
                if text:
                    r.n_out += 1
                    r.pieces.append(text)
                    r.t_last = time.perf_counter()
                    r.t_first = r.t_first or r.t_last
            if out.disconnected:
                r.client_left = True
                break
            if raw:
                await out.chunk(raw)
            if data is None:
                break
            chunk = await anext(chunks, None)
        else:
            r.failure = UpstreamConnectionError("upstream closed the stream before [DONE]")
    except Exception as e:  # upstream reset, timeout, or a bug: the partial stream is still billed
        r.failure = e
        if not isinstance(e, UPSTREAM_ERRORS):
            log.exception("unexpected error while relaying a stream")
    finally:
        await chunks.aclose()  # type: ignore[attr-defined]
    return r


class Recorder:
    """A Sink that also keeps the SSE events it forwards (not margin's own comments), so a
    complete stream can be cached and replayed."""

    def __init__(self, out: Sink):
        self.out = out
        self.events: list[str] = []

    @property
    def disconnected(self) -> bool:
        return self.out.disconnected

    async def chunk(self, data: bytes) -> None:
        if not data.startswith(b":"):
            self.events.append(data.decode(errors="replace"))
        await self.out.chunk(data)
