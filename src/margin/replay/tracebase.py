"""The columnar trace every replay reader produces, and the helpers the readers share."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import orjson

ATTRIBUTION = ("org", "team", "user", "app", "env", "workflow", "key_id", "model", "requested_model", "tier",
               "priority", "run_id")
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
    tool_calls: np.ndarray | None = None  # int64: tool calls the recorded answer issued (run caps)
    escalated: np.ndarray | None = None  # int8: the recorded cascade verdict on the first step (1, 0; -1 unknown)
    meta: dict[str, Any] = field(default_factory=dict)  # the margin trace header (e.g. the ledger's cascade counts)

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
            responses=lst(self.responses), prompt_hash=arr(self.prompt_hash), tool_calls=arr(self.tool_calls),
            escalated=arr(self.escalated))

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
