"""The mock upstream's `/v1/responses` (OpenAI Responses API): its chat answer, whole or streamed,
put into the Responses shapes by the same bridge margin uses for chat-only providers
(responses_via_chat.py), so the Responses shapes are written once; tests check them against the
openai SDK's own models. Streams are named events (`event:` + `data:`), one
`response.output_text.delta` per token, ending with `response.completed` (or
`response.incomplete` when `max_output_tokens` cut the answer) that carries the usage; there is
no `[DONE]`."""

from __future__ import annotations

from typing import Any

import orjson

from margin.providers.responses_via_chat import StreamConverter, from_chat


def body(req: dict[str, Any], chat_body: bytes) -> bytes:
    return orjson.dumps(from_chat(req, orjson.loads(chat_body)))


def _chunks(sse: bytes) -> list[dict[str, Any] | None]:
    """The chat chunks of mock_text's SSE bytes; None for [DONE]."""
    out: list[dict[str, Any] | None] = []
    for event in sse.split(b"\n\n"):
        if event.startswith(b"data: "):
            data = event[6:]
            out.append(None if data == b"[DONE]" else orjson.loads(data))
    return out


def events(req: dict[str, Any], chat_events: list[bytes], chat_tail: bytes) -> tuple[list[bytes], bytes]:
    """A chat stream (one event per token, the tail) as Responses events: one entry per chat event,
    so a reset cuts the stream at the same token; the tail closes the response."""
    conv = StreamConverter(req)

    def converted(sse: bytes) -> bytes:
        return b"".join(c.raw for d in _chunks(sse) for c in (conv.close() if d is None else conv.feed(d)))

    return [converted(e) for e in chat_events], converted(chat_tail)
