"""LLM request traces in one columnar form (NumPy arrays), read from the formats margin meets:

- Azure LLM inference trace 2023 CSV: ``TIMESTAMP,ContextTokens,GeneratedTokens``;
- Mooncake JSONL: ``{"timestamp": ms, "input_length", "output_length", "hash_ids": [...]}``;
- margin trace JSONL (``margin export trace``, or hand-written): one request per line with token counts
  and, where known, attribution, the model asked for, ``messages`` / ``prompt`` and a reference
  ``response`` (read by margintrace.py).

The format is detected from the content, never from the file name."""

from __future__ import annotations

import math
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import orjson

from margin.replay.margintrace import read_margin
from margin.replay.tracebase import ATTRIBUTION, EPOCH, Trace, TraceError, _finish, _int, _jsonl

__all__ = ["ATTRIBUTION", "Trace", "TraceError", "blocks_needed", "read_trace", "resample"]
AZURE_HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens"


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
            trace = read_margin(p, limit)
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


def blocks_needed(input_tokens: int, block_tokens: int = 512) -> int:
    """How many prefix blocks a prompt spans (Mooncake hashes every 512 tokens, the last one partial)."""
    return math.ceil(input_tokens / block_tokens)
