"""LLM request traces in one columnar form (NumPy arrays), read from the formats margin meets:

- Azure LLM inference trace 2023 CSV: ``TIMESTAMP,ContextTokens,GeneratedTokens``;
- Mooncake JSONL: ``{"timestamp": ms, "input_length", "output_length", "hash_ids": [...]}``;
- margin trace JSONL (``margin export trace``, or hand-written): one request per line with token counts
  and, where known, attribution, the model asked for, ``messages`` / ``prompt`` and a reference
  ``response``; an optional first line ``{"margin_trace": 1, "start": ISO}`` gives the wall-clock start.

The format is detected from the content, never from the file name."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from margin.pricing.tokens import count_messages, count_text

ATTRIBUTION = ("org", "team", "user", "app", "env", "workflow", "key_id", "model", "requested_model", "tier",
               "priority")
AZURE_HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens"
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class TraceError(ValueError):
    """A trace file is missing, of an unknown format, or has a bad line; the message says where."""


@dataclass
class Trace:
    """One request per index. ``arrival_s`` is float64 seconds from the first request, sorted;
    token counts are int64. Optional columns are None when the source does not record them."""

    name: str
    source: str  # azure | mooncake | margin
    arrival_s: np.ndarray
    input_tokens: np.ndarray
    output_tokens: np.ndarray
    hash_ids: list[np.ndarray] | None = None  # Mooncake 512-token prefix block ids per request
    start: datetime | None = None  # wall-clock time of arrival 0, where the source gives one
    attrs: dict[str, np.ndarray] = field(default_factory=dict)  # object arrays of str (ATTRIBUTION)
    tags: np.ndarray | None = None  # object array of sorted ((k, v), ...) tuples
    cached_input_tokens: np.ndarray | None = None  # as recorded (ledger exports)
    max_tokens: np.ndarray | None = None  # int64, 0 = the request set none
    temperature: np.ndarray | None = None  # float64, NaN = not recorded
    prompts: list[str | None] | None = None  # the text a router reads (last user turn, or the prompt)
    messages: list[list[dict[str, Any]] | None] | None = None
    responses: list[str | None] | None = None  # reference answers (migration checks)
    prompt_hash: np.ndarray | None = None  # object array of str: a stable hash of the full prompt

    def __len__(self) -> int:
        return int(self.arrival_s.shape[0])

    @property
    def duration_s(self) -> float:
        return float(self.arrival_s[-1] - self.arrival_s[0]) if len(self) > 1 else 0.0

    @property
    def rate_per_s(self) -> float:
        return (len(self) - 1) / self.duration_s if self.duration_s > 0 else float("nan")

    def attr(self, name: str) -> np.ndarray | None:
        return self.attrs.get(name)

    def take(self, idx: np.ndarray) -> Trace:
        """The requests at ``idx`` (in that order; arrival times are kept as they are)."""
        pick = np.asarray(idx, dtype=np.int64)

        def lst(v: list[Any] | None) -> list[Any] | None:
            return None if v is None else [v[i] for i in pick]

        def arr(v: np.ndarray | None) -> np.ndarray | None:
            return None if v is None else v[pick]

        return replace(
            self, arrival_s=self.arrival_s[pick], input_tokens=self.input_tokens[pick],
            output_tokens=self.output_tokens[pick], hash_ids=lst(self.hash_ids),
            attrs={k: v[pick] for k, v in self.attrs.items()}, tags=arr(self.tags),
            cached_input_tokens=arr(self.cached_input_tokens), max_tokens=arr(self.max_tokens),
            temperature=arr(self.temperature), prompts=lst(self.prompts), messages=lst(self.messages),
            responses=lst(self.responses), prompt_hash=arr(self.prompt_hash))

    def scaled(self, k: float) -> Trace:
        """The same requests arriving ``k`` times faster (``--rate-scale``)."""
        if not k > 0:
            raise TraceError(f"rate scale must be > 0, not {k}")
        return replace(self, arrival_s=self.arrival_s / k, name=f"{self.name} x{k:g}")

    def summary(self) -> dict[str, Any]:
        n = len(self)
        out: dict[str, Any] = {
            "name": self.name, "format": self.source, "requests": n, "duration_s": round(self.duration_s, 3),
            "rate_per_s": round(self.rate_per_s, 3) if n > 1 and self.duration_s > 0 else None,
            "mean_input_tokens": round(float(self.input_tokens.mean()), 1) if n else 0.0,
            "mean_output_tokens": round(float(self.output_tokens.mean()), 1) if n else 0.0,
            "start": self.start.isoformat() if self.start else None,
            "has_hash_ids": self.hash_ids is not None, "has_prompts": self.prompts is not None,
            "has_responses": self.responses is not None, "attribution": sorted(self.attrs),
        }
        return out


def resample(trace: Trace, n: int, seed: int = 0) -> Trace:
    """``n`` requests drawn with replacement from ``trace``, arriving with inter-arrival gaps drawn
    from the trace's own (so the rate and burstiness stay those of the source)."""
    if len(trace) < 2:
        raise TraceError("resampling needs a trace of at least 2 requests")
    rng = np.random.default_rng(seed)
    gaps = np.diff(trace.arrival_s)
    rows = rng.integers(0, len(trace), size=n)
    arrival = np.concatenate([[0.0], np.cumsum(gaps[rng.integers(0, gaps.shape[0], size=n - 1)])])
    out = trace.take(rows)
    return replace(out, arrival_s=arrival, name=f"{trace.name} resampled to {n}")


# -- readers ----------------------------------------------------------------------------------

def read_trace(path: str | Path, limit: int | None = None) -> Trace:
    """Read a trace, detecting its format from the content. ``limit`` keeps the first N requests."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            head = f.read(4096)
    except FileNotFoundError:
        raise TraceError(f"{p}: no such file") from None
    except IsADirectoryError:
        raise TraceError(f"{p}: is a directory, not a trace file") from None
    if limit is not None and limit < 1:
        raise TraceError(f"limit must be >= 1, not {limit}")
    first = head.lstrip().split(b"\n", 1)[0].strip().decode("utf-8", errors="replace")
    if first.replace(" ", "").startswith(AZURE_HEADER):
        trace = _azure(p, limit)
    elif first.startswith("{"):
        try:
            obj = orjson.loads(first)
        except orjson.JSONDecodeError:
            obj = None
        if isinstance(obj, dict) and "input_length" in obj:
            trace = _mooncake(p, limit)
        elif isinstance(obj, dict) and ({"margin_trace", "input_tokens", "messages", "prompt"} & obj.keys()):
            trace = _margin(p, limit)
        else:
            raise TraceError(_unknown(p, first))
    else:
        raise TraceError(_unknown(p, first))
    if len(trace) == 0:
        raise TraceError(f"{p}: the trace holds no requests")
    return trace


def _unknown(p: Path, first: str) -> str:
    shown = first[:120] + ("..." if len(first) > 120 else "")
    return (f"{p}: not a trace margin can read. Expected an Azure 2023 CSV (header {AZURE_HEADER}), "
            "Mooncake JSONL (timestamp, input_length, output_length, hash_ids) or a margin trace JSONL "
            f"(input_tokens/messages/prompt per line; `margin export trace`). First line: {shown!r}")


def _finish(name: str, source: str, t: np.ndarray, inp: np.ndarray, out: np.ndarray, **cols: Any) -> Trace:
    """Sort by arrival (stable), shift so the first request is at 0, build the Trace."""
    if inp.size and (inp.min() < 0 or out.min() < 0):
        raise TraceError(f"{name}: negative token counts")
    order = np.argsort(t, kind="stable")
    trace = Trace(name, source, t.astype(np.float64), inp.astype(np.int64), out.astype(np.int64), **cols)
    if not np.all(order == np.arange(order.shape[0])):
        trace = trace.take(order)
    if len(trace):
        t0 = float(trace.arrival_s[0])
        trace.arrival_s = trace.arrival_s - t0
        if trace.start is not None and t0:
            trace.start = trace.start + timedelta(seconds=t0)
    return trace


def _azure(p: Path, limit: int | None) -> Trace:
    """Vectorised (one split, NumPy parses the times); any irregular line falls back to the
    line-by-line reader, which names the line."""
    body = p.read_text(encoding="utf-8").replace("\r", "").strip().split("\n", 1)
    rows = body[1].split("\n", -1 if limit is None else limit)[:limit] if len(body) > 1 else []
    fields = ",".join(rows).split(",") if rows else []
    if len(fields) == 3 * len(rows):
        try:
            when = np.array(fields[0::3]).astype("datetime64[ns]")
            inp = np.array(fields[1::3]).astype(np.int64)
            out = np.array(fields[2::3]).astype(np.int64)
        except ValueError:
            return _azure_lines(p, limit)
        ns = when.astype(np.int64)
        start = EPOCH + timedelta(microseconds=int(ns.min()) // 1000) if ns.size else None
        t = (ns - ns.min()).astype(np.float64) / 1e9 if ns.size else np.zeros(0)
        return _finish(p.stem, "azure", t, inp, out, start=start)
    return _azure_lines(p, limit)


def _azure_lines(p: Path, limit: int | None) -> Trace:
    ts: list[float] = []
    inp: list[int] = []
    out: list[int] = []
    with p.open("r", encoding="utf-8") as f:
        next(f)
        for lineno, line in enumerate(f, 2):
            if limit is not None and len(ts) >= limit:
                break
            if not line.strip():
                continue
            parts = line.rstrip("\n").split(",")
            try:
                if len(parts) != 3:
                    raise ValueError(f"expected 3 fields, got {len(parts)}")
                # Python's fromisoformat takes the trace's 7 fractional digits (truncated to microseconds).
                when = datetime.fromisoformat(parts[0].strip()).replace(tzinfo=UTC)
                ts.append(when.timestamp())
                inp.append(int(parts[1]))
                out.append(int(parts[2]))
            except ValueError as e:
                raise TraceError(f"{p}:{lineno}: bad Azure trace line {line.strip()[:80]!r}: {e}") from None
    t = np.asarray(ts, dtype=np.float64)
    start = datetime.fromtimestamp(float(t.min()), UTC) if t.size else None
    return _finish(p.stem, "azure", t - (t.min() if t.size else 0.0), np.asarray(inp), np.asarray(out), start=start)


def _jsonl(p: Path) -> Any:
    with p.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                obj = orjson.loads(raw)
            except orjson.JSONDecodeError as e:
                raise TraceError(f"{p}:{lineno}: not valid JSON: {e}") from None
            if not isinstance(obj, dict):
                raise TraceError(f"{p}:{lineno}: expected a JSON object per line")
            yield lineno, obj


def _int(obj: dict[str, Any], key: str, where: str) -> int:
    v = obj.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise TraceError(f"{where}: {key!r} must be a non-negative integer, not {v!r}")
    return v


def _mooncake(p: Path, limit: int | None) -> Trace:
    ts: list[float] = []
    inp: list[int] = []
    out: list[int] = []
    blocks: list[np.ndarray] = []
    for lineno, obj in _jsonl(p):
        if limit is not None and len(ts) >= limit:
            break
        where = f"{p}:{lineno}"
        stamp = obj.get("timestamp")
        if not isinstance(stamp, int | float) or isinstance(stamp, bool):
            raise TraceError(f"{where}: 'timestamp' (ms) must be a number, not {stamp!r}")
        ts.append(float(stamp) / 1000.0)
        inp.append(_int(obj, "input_length", where))
        out.append(_int(obj, "output_length", where))
        h = obj.get("hash_ids", [])
        if not isinstance(h, list):
            raise TraceError(f"{where}: 'hash_ids' must be a list of block ids")
        blocks.append(np.asarray(h, dtype=np.int64))
    return _finish(p.stem, "mooncake", np.asarray(ts), np.asarray(inp), np.asarray(out), hash_ids=blocks)


def _last_user_text(messages: list[Any]) -> str:
    for m in reversed(messages):
        if isinstance(m, dict) and m.get("role") == "user":
            c = m.get("content")
            if isinstance(c, list):
                return " ".join(str(x.get("text", "")) for x in c if isinstance(x, dict))
            return str(c or "")
    return ""


def _margin(p: Path, limit: int | None) -> Trace:
    start: datetime | None = None
    rows: list[dict[str, Any]] = []
    for lineno, obj in _jsonl(p):
        if "margin_trace" in obj:
            if obj.get("margin_trace") != 1:
                raise TraceError(f"{p}:{lineno}: margin_trace version {obj.get('margin_trace')!r} is not supported (1)")
            if obj.get("start"):
                start = _when(obj["start"], f"{p}:{lineno}")
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
    seen = {"ts": False, "t": False, "cached": False, "max_tokens": False, "temperature": False, "prompt": False,
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
        hash_ids=blocks if seen["hash_ids"] else None)


def _when(value: Any, where: str) -> datetime:
    try:
        d = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        raise TraceError(f"{where}: {value!r} is not an ISO-8601 time") from None
    return d if d.tzinfo else d.replace(tzinfo=UTC)


def blocks_needed(input_tokens: int, block_tokens: int = 512) -> int:
    """How many prefix blocks a prompt spans (Mooncake hashes every 512 tokens, the last one partial)."""
    return math.ceil(input_tokens / block_tokens)
