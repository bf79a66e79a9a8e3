"""Deterministic text, token counts, embeddings and OpenAI-shaped bodies for the mock upstream.

Everything here is a pure function of its arguments (no process-salted `hash()`), so two mock
processes started with the same seed give byte-identical answers.
"""

from __future__ import annotations

import base64
import math
import random
import struct
import time
from hashlib import blake2b
from typing import Any

import orjson

# Exactly 64 words, so one hash byte picks one word without bias (b & 63).
_WORD_TEXT = """the of and to in is was for on that with as by at from it an be this are or which has
    had not but were they one all their there been more also when who will would other into time
    only new some could these two may first than then any like over such our out
    cost budget cache route latency margin"""
WORDS: tuple[str, ...] = tuple(_WORD_TEXT.split())
_TOKENS: tuple[str, ...] = tuple(w + " " for w in WORDS)
assert len(WORDS) == 64

# Per-message overhead, mirroring the few framing tokens real chat templates add per turn.
MESSAGE_OVERHEAD = 4


def _key(*parts: str) -> bytes:
    # blake2b rather than hash(): str hashing is salted per process (PYTHONHASHSEED).
    return b"\0".join(p.encode("utf-8", "surrogatepass") for p in parts)


def tokens_for(seed: int, model: str, prompt: str, n: int) -> list[str]:
    """`n` tokens ("word "), a function of (seed, model, prompt). Shorter outputs are prefixes
    of longer ones, so a `max_tokens` cap truncates rather than changes the text."""
    key = _key(str(seed), model, prompt)
    out: list[str] = []
    block = 0
    # Hash bytes in counter mode: ~5x cheaper per request than seeding a random.Random.
    while len(out) < n:
        digest = blake2b(key + block.to_bytes(4, "little"), digest_size=64).digest()
        out.extend([_TOKENS[b & 63] for b in digest[: n - len(out)]])
        block += 1
    return out


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # multi-part content: only text parts count
        return " ".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def chat_prompt(messages: Any) -> tuple[str, int]:
    """(prompt text used for seeding, prompt token count) for a chat `messages` list."""
    if not isinstance(messages, list):
        return "", 0
    texts: list[str] = []
    count = 0
    for m in messages:
        text = _content_text(m.get("content")) if isinstance(m, dict) else ""
        texts.append(text)
        count += len(text.split()) + MESSAGE_OVERHEAD
    return "\n".join(texts), count


def _piece_text(piece: Any) -> tuple[str, int]:
    if isinstance(piece, str):
        return piece, len(piece.split())
    if isinstance(piece, list):  # pre-tokenised input: one token per id
        return " ".join(map(str, piece)), len(piece)
    return "", 0


def inputs_of(value: Any) -> list[tuple[str, int]]:
    """Split a completions `prompt` / embeddings `input` into (text, token count) items."""
    if isinstance(value, list) and value and not isinstance(value[0], int):
        return [_piece_text(v) for v in value]
    return [_piece_text(value)]


def embedding(seed: int, model: str, text: str, dim: int) -> list[float]:
    """A unit-length vector of `dim` floats, a function of (seed, model, text)."""
    rng = random.Random(
        int.from_bytes(blake2b(_key(str(seed), model, "embed", text), digest_size=8).digest())
    )
    vec = [rng.uniform(-1.0, 1.0) for _ in range(max(dim, 1))]
    norm = math.sqrt(sum(x * x for x in vec)) or 1.0
    return [x / norm for x in vec]


# --- OpenAI wire format -------------------------------------------------------------------------

_ERROR_TYPES: dict[int, tuple[str, str | None]] = {
    400: ("invalid_request_error", None),
    401: ("authentication_error", "invalid_api_key"),
    403: ("permission_error", None),
    404: ("not_found_error", None),
    429: ("rate_limit_error", "rate_limit_exceeded"),
}
DONE = b"data: [DONE]\n\n"


def error_body(status: int, message: str) -> bytes:
    """An OpenAI-style error body for `status`."""
    default = ("server_error" if status >= 500 else "invalid_request_error", None)
    etype, code = _ERROR_TYPES.get(status, default)
    return orjson.dumps({"error": {"message": message, "type": etype, "param": None, "code": code}})


def sse(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def usage(prompt: int, visible: int, cached: int, reasoning: int) -> dict[str, Any]:
    completion = visible + reasoning  # reasoning tokens are billed as completion tokens
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": max(0, min(cached, prompt))},
        "completion_tokens_details": {"reasoning_tokens": reasoning},
    }


def _choice(chat: bool, text: str | None, finish: str | None, first: bool = False) -> dict[str, Any]:
    if not chat:
        return {"text": text or "", "index": 0, "logprobs": None, "finish_reason": finish}
    delta: dict[str, Any] = {"role": "assistant"} if first else {}
    if text is not None:
        delta["content"] = text
    return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}


def completion_body(
    rid: str, model: str, chat: bool, tokens: list[str], finish: str, use: dict[str, Any] | None,
    logprob: float | None = None,
) -> bytes:
    """A non-streaming chat.completion / text_completion body (with token logprobs if given)."""
    text = "".join(tokens)
    lp: dict[str, Any] | None = None
    if logprob is not None:
        lp = ({"content": [{"token": t, "logprob": logprob, "bytes": list(t.encode()), "top_logprobs": []}
                           for t in tokens]} if chat else {"tokens": tokens, "token_logprobs": [logprob] * len(tokens)})
    choice: dict[str, Any] = (
        {
            "index": 0,
            "message": {"role": "assistant", "content": text, "refusal": None},
            "logprobs": lp,
            "finish_reason": finish,
        }
        if chat
        else {"text": text, "index": 0, "logprobs": lp, "finish_reason": finish}
    )
    out: dict[str, Any] = {
        "id": rid,
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
    }
    if use is not None:
        out["usage"] = use
    return orjson.dumps(out)


def stream_events(
    rid: str, model: str, chat: bool, tokens: list[str], finish: str, use: dict[str, Any] | None
) -> tuple[list[bytes], bytes]:
    """(one SSE event per token, the tail: finish chunk [+ usage chunk] + [DONE]).
    `use` is None unless the client asked for `stream_options.include_usage`."""
    head: dict[str, Any] = {
        "id": rid,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
    }
    if use is not None:
        head["usage"] = None  # OpenAI sets usage: null on every chunk but the last one
    # Token chunks differ only in the token: splice it into a pre-serialised template rather
    # than serialising a dict per token.
    marker = "\x00TOKEN\x00"
    pre, post = sse({**head, "choices": [_choice(chat, marker, None)]}).split(orjson.dumps(marker))
    events = [pre + orjson.dumps(t) + post for t in tokens]
    if chat:  # the first chunk also carries the role, as OpenAI's does
        first = sse({**head, "choices": [_choice(chat, tokens[0] if tokens else "", None, first=True)]})
        events = [first, *events[1:]]
    tail = sse({**head, "choices": [_choice(chat, None, finish)]})
    if use is not None:
        tail += sse({**head, "choices": [], "usage": use})
    return events, tail + DONE


def embeddings_body(
    seed: int, model: str, value: Any, dim: int, as_base64: bool, report_usage: bool
) -> bytes:
    data: list[dict[str, Any]] = []
    total = 0
    for i, (text, n) in enumerate(inputs_of(value)):
        total += n
        vec = embedding(seed, model, text, dim)
        # base64 = little-endian float32, which is what the SDK decodes
        emb: Any = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode() if as_base64 else vec
        data.append({"object": "embedding", "index": i, "embedding": emb})
    out: dict[str, Any] = {"object": "list", "data": data, "model": model}
    if report_usage:
        out["usage"] = {"prompt_tokens": total, "total_tokens": total}
    return orjson.dumps(out)


def tool_calls(name: str, n: int, seed_text: str) -> list[dict[str, Any]]:
    """`n` deterministic calls of the tool `name` (ids and arguments derived from the prompt)."""
    h = blake2b(seed_text.encode(), digest_size=4).hexdigest()
    return [{"id": f"call_{h}{i}", "type": "function",
             "function": {"name": name, "arguments": orjson.dumps({"step": i, "q": h}).decode()}}
            for i in range(n)]


def tool_call_body(rid: str, model: str, calls: list[dict[str, Any]], use: dict[str, Any] | None) -> bytes:
    out: dict[str, Any] = {
        "id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": None, "tool_calls": calls},
                     "logprobs": None, "finish_reason": "tool_calls"}],
    }
    if use is not None:
        out["usage"] = use
    return orjson.dumps(out)


def tool_call_events(rid: str, model: str, calls: list[dict[str, Any]], use: dict[str, Any] | None) -> bytes:
    """A streamed tool-call answer, as OpenAI sends it: each call's first delta carries its id."""
    head: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()),
                            "model": model}
    out = b""
    for i, c in enumerate(calls):
        delta: dict[str, Any] = {"tool_calls": [{"index": i, **c}]}
        if i == 0:
            delta["role"] = "assistant"
        out += sse({**head, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}]})
    out += sse({**head, "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "tool_calls"}]})
    if use is not None:
        out += sse({**head, "choices": [], "usage": use})
    return out + DONE
