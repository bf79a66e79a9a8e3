"""The margin trace JSONL reader (`margin export trace`, or hand-written): one request per line with
token counts or `messages`/`prompt`, and where known attribution, the model asked and served, a
reference `response`, the run it belongs to, the tool calls its answer issued and whether a cascade
escalated it; an optional first line `{"margin_trace": 1, "start": ISO, ...}` carries the
wall-clock start and what the ledger knew (e.g. cascade escalation counts), kept as `Trace.meta`."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from margin.pricing.tokens import count_messages, count_text
from margin.replay.tracebase import ATTRIBUTION, Trace, TraceError, _finish, _int, _jsonl


def _last_user_text(messages: list[Any]) -> str:
    for m in reversed(messages):
        if isinstance(m, dict) and m.get("role") == "user":
            c = m.get("content")
            if isinstance(c, list):
                return " ".join(str(x.get("text", "")) for x in c if isinstance(x, dict))
            return str(c or "")
    return ""


def read_margin(p: Path, limit: int | None) -> Trace:
    start: datetime | None = None
    meta: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    for lineno, obj in _jsonl(p):
        if "margin_trace" in obj:
            if obj.get("margin_trace") != 1:
                raise TraceError(f"{p}:{lineno}: margin_trace version {obj.get('margin_trace')!r} is not supported (1)")
            if obj.get("start"):
                start = _when(obj["start"], f"{p}:{lineno}")
            meta = obj
            continue
        if limit is not None and len(rows) >= limit:
            break
        obj["_where"] = f"{p}:{lineno}"
        rows.append(obj)
    n = len(rows)
    t = np.zeros(n)
    inp = np.zeros(n, dtype=np.int64)
    out = np.zeros(n, dtype=np.int64)
    cached = np.zeros(n, dtype=np.int64)
    max_tokens = np.zeros(n, dtype=np.int64)
    temperature = np.full(n, np.nan)
    attrs = {k: np.full(n, "", dtype=object) for k in ATTRIBUTION}
    tags = np.empty(n, dtype=object)
    prompts: list[str | None] = [None] * n
    messages: list[list[dict[str, Any]] | None] = [None] * n
    responses: list[str | None] = [None] * n
    hashes = np.full(n, "", dtype=object)
    blocks: list[np.ndarray] = []
    tools = np.zeros(n, dtype=np.int64)
    escalated = np.full(n, -1, dtype=np.int8)
    seen = {"tool_calls": False, "escalated": False,
            "ts": False, "t": False, "cached": False, "max_tokens": False, "temperature": False, "prompt": False,
            "response": False, "prompt_hash": False, "hash_ids": False}
    for i, r in enumerate(rows):
        where = r["_where"]
        if "ts" in r:
            seen["ts"] = True
            when = _when(r["ts"], where)
            start = start or when
            t[i] = (when - start).total_seconds()
        elif "t" in r:
            seen["t"] = True
            if not isinstance(r["t"], int | float) or isinstance(r["t"], bool):
                raise TraceError(f"{where}: 't' (seconds from the start) must be a number")
            t[i] = float(r["t"])
        else:
            t[i] = float(i)  # no time recorded: one request a second, in file order
        msgs, prompt = r.get("messages"), r.get("prompt")
        if msgs is not None:
            if not isinstance(msgs, list) or not all(isinstance(m, dict) for m in msgs):
                raise TraceError(f"{where}: 'messages' must be a list of message objects")
            messages[i], prompts[i] = msgs, _last_user_text(msgs)
        elif prompt is not None:
            prompts[i] = str(prompt)
        seen["prompt"] |= prompts[i] is not None
        if "input_tokens" in r:
            inp[i] = _int(r, "input_tokens", where)
        elif msgs is not None:
            inp[i] = count_messages(msgs)
        elif prompt is not None:
            inp[i] = count_text(str(prompt))
        else:
            raise TraceError(f"{where}: a request needs 'input_tokens', 'messages' or 'prompt'")
        if r.get("response") is not None:
            responses[i] = str(r["response"])
            seen["response"] = True
        if "output_tokens" in r:
            out[i] = _int(r, "output_tokens", where)
        elif responses[i] is not None:
            out[i] = count_text(responses[i] or "")
        else:
            raise TraceError(f"{where}: a request needs 'output_tokens' or a 'response'")
        if r.get("cached_input_tokens") is not None:
            cached[i] = min(_int(r, "cached_input_tokens", where), int(inp[i]))
            seen["cached"] = True
        if r.get("max_tokens") is not None:
            max_tokens[i] = _int(r, "max_tokens", where)
            seen["max_tokens"] = True
        if r.get("temperature") is not None:
            temperature[i] = float(r["temperature"])
            seen["temperature"] = True
        for k in ATTRIBUTION:
            v = r.get(k)
            if v is not None:
                attrs[k][i] = str(v)
        raw_tags = r.get("tags") or {}
        if isinstance(raw_tags, str):
            raw_tags = orjson.loads(raw_tags or "{}")
        if not isinstance(raw_tags, dict):
            raise TraceError(f"{where}: 'tags' must be an object of key: value")
        tags[i] = tuple(sorted((str(k), str(v)) for k, v in raw_tags.items()))
        if r.get("prompt_hash"):
            hashes[i] = str(r["prompt_hash"])
            seen["prompt_hash"] = True
        if r.get("tool_calls") is not None:
            tools[i] = _int(r, "tool_calls", where)
            seen["tool_calls"] = True
        if r.get("cascade_escalated") is not None:
            if not isinstance(r["cascade_escalated"], bool):
                raise TraceError(f"{where}: 'cascade_escalated' must be true or false")
            escalated[i] = int(r["cascade_escalated"])
            seen["escalated"] = True
        h = r.get("hash_ids")
        seen["hash_ids"] |= h is not None
        blocks.append(np.asarray(h or [], dtype=np.int64))
    if seen["ts"] and seen["t"]:
        raise TraceError(f"{p}: mixes 'ts' (ISO time) and 't' (seconds) lines; use one")
    kept = {k: v for k, v in attrs.items() if any(v)}
    return _finish(
        p.stem, "margin", t, inp, out, start=start, attrs=kept,
        tags=tags if any(tags) else None,
        cached_input_tokens=cached if seen["cached"] else None,
        max_tokens=max_tokens if seen["max_tokens"] else None,
        temperature=temperature if seen["temperature"] else None,
        prompts=prompts if seen["prompt"] else None,
        messages=messages if any(m is not None for m in messages) else None,
        responses=responses if seen["response"] else None,
        prompt_hash=hashes if seen["prompt_hash"] else None,
        hash_ids=blocks if seen["hash_ids"] else None,
        tool_calls=tools if seen["tool_calls"] else None,
        escalated=escalated if seen["escalated"] else None, meta=meta)


def _when(value: Any, where: str) -> datetime:
    try:
        d = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        raise TraceError(f"{where}: {value!r} is not an ISO-8601 time") from None
    return d if d.tzinfo else d.replace(tzinfo=UTC)
