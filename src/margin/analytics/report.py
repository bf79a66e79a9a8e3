"""Spend report over ledger rows in Python: requests, tokens, exact USD, latency percentiles,
error rate. The reference the warehouse's `queries.spend_by` is tested against; `margin report`
itself runs in DuckDB (queries.py)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import orjson

from margin.analytics.filters import parse_since
from margin.domain import usd
from margin.ledger.schema import Row

__all__ = ["GROUP_COLUMNS", "check_by", "parse_since", "percentile", "spend"]

GROUP_COLUMNS = ("org", "team", "user", "app", "env", "key_id", "model", "requested_model", "provider",
                 "endpoint", "workflow", "run_id", "status", "usage_source", "day", "hour")


def check_by(by: list[str]) -> list[str]:
    for b in by:
        if b not in GROUP_COLUMNS and not b.startswith("tag:"):
            raise ValueError(f"--by {b!r}: choose from {', '.join(GROUP_COLUMNS)} or tag:<name>")
    return by


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (no interpolation: every value reported was really observed)."""
    if not values:
        return None
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(-(-q * len(s) // 1)) - 1))
    return s[k]


def _group_value(row: Row, col: str) -> Any:
    if col == "day":
        return str(row["ts_start"])[:10]
    if col == "hour":
        return str(row["ts_start"])[:13] + ":00"
    if col.startswith("tag:"):
        tags = row.get("tags") or "{}"
        return (orjson.loads(tags) if isinstance(tags, str) else tags).get(col[4:], "")
    v = row.get(col)
    if col == "model" and not v and row.get("requested_model"):
        return f"{row['requested_model']} (not served)"  # refused before any model was called
    return "" if v is None else v


@dataclass
class _Acc:
    requests: int = 0
    errors: int = 0
    input_tokens: int = 0
    cached_input_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    cost: Decimal = Decimal(0)
    energy_j: float = 0.0
    latencies: list[float] = field(default_factory=list)


def spend(rows: Iterable[Row], by: list[str]) -> list[dict[str, Any]]:
    groups: dict[tuple[Any, ...], _Acc] = {}
    for r in rows:
        key = tuple(_group_value(r, c) for c in by)
        a = groups.get(key)
        if a is None:
            a = groups[key] = _Acc()
        a.requests += 1
        if int(r.get("status") or 0) >= 400:
            a.errors += 1
        a.input_tokens += int(r.get("input_tokens") or 0)
        a.cached_input_tokens += int(r.get("cached_input_tokens") or 0)
        a.output_tokens += int(r.get("output_tokens") or 0)
        a.reasoning_tokens += int(r.get("reasoning_tokens") or 0)
        a.cost += Decimal(str(r.get("cost_usd") or 0))
        a.energy_j += float(r.get("energy_j") or 0)
        if r.get("latency_ms") is not None:
            a.latencies.append(float(r["latency_ms"]))
    out = []
    for key, a in sorted(groups.items(), key=lambda kv: kv[1].cost, reverse=True):
        out.append({
            **dict(zip(by, key, strict=True)),
            "requests": a.requests, "errors": a.errors,
            "error_rate": round(a.errors / a.requests, 4) if a.requests else 0.0,
            "input_tokens": a.input_tokens, "cached_input_tokens": a.cached_input_tokens,
            "output_tokens": a.output_tokens, "reasoning_tokens": a.reasoning_tokens,
            "cost_usd": usd(a.cost), "energy_j": round(a.energy_j, 3),
            "p50_ms": percentile(a.latencies, 0.50), "p95_ms": percentile(a.latencies, 0.95),
        })
    return out
