"""Outcomes of agent runs: the validator behind `POST /v1/outcomes`, which outcome of a run counts,
and the arithmetic of cost per successful outcome, baselines and ROI. Pure: no I/O, no clock
(time is an argument)."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

import orjson

from margin.analytics.filters import parse_period
from margin.domain import usd
from margin.ledger.schema import Row

STATUSES = ("success", "failure", "escalated")
FIELDS = frozenset({"outcome_id", "run_id", "workflow", "status", "value_usd", "quality", "human_minutes",
                    "metadata", "ts"})
MAX_ID = 200
MAX_METADATA_BYTES = 16 * 1024
ZERO = Decimal(0)


def _text(obj: dict[str, Any], name: str, required: bool) -> str | None:
    v = obj.get(name)
    if v is None:
        if required:
            raise ValueError(f"'{name}' is required")
        return None
    if not isinstance(v, str) or not v.strip():
        raise ValueError(f"'{name}' must be a non-empty string")
    if len(v) > MAX_ID:
        raise ValueError(f"'{name}' is longer than {MAX_ID} characters")
    return v


def _number(obj: dict[str, Any], name: str, lo: float, hi: float | None) -> float | None:
    v = obj.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise ValueError(f"'{name}' must be a number")
    if v < lo or (hi is not None and v > hi):
        raise ValueError(f"'{name}' must be between {lo:g} and {hi:g}" if hi is not None
                         else f"'{name}' must be >= {lo:g}")
    return float(v)


def _money(obj: dict[str, Any], name: str) -> str | None:
    v = obj.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, str | int | float):
        raise ValueError(f"'{name}' must be a decimal string such as \"12.50\" (or a number)")
    try:
        d = Decimal(str(v))
    except InvalidOperation:
        raise ValueError(f"'{name}' is not a decimal number: {v!r}") from None
    if not d.is_finite() or d < 0:
        raise ValueError(f"'{name}' must be a finite amount >= 0")
    return usd(d)


def _time(obj: dict[str, Any], now: datetime) -> datetime:
    v = obj.get("ts")
    if v is None:
        return now
    if not isinstance(v, str):
        raise ValueError("'ts' must be an ISO-8601 time such as 2026-11-05T14:03:00Z")
    try:
        t = datetime.fromisoformat(v)
    except ValueError:
        raise ValueError(f"'ts' is not an ISO-8601 time: {v!r}") from None
    return (t if t.tzinfo else t.replace(tzinfo=UTC)).astimezone(UTC)


def parse_outcome(obj: Any, now: datetime | None = None) -> Row:
    """Validate a `POST /v1/outcomes` body into an outcomes row; ValueError says precisely what is
    wrong. Without `outcome_id` the id is a hash of the body, so a client retrying the same POST
    stores it once."""
    now = (now or datetime.now(UTC)).astimezone(UTC)
    if not isinstance(obj, dict):
        raise ValueError("the body must be a JSON object")
    unknown = sorted(set(obj) - FIELDS)
    if unknown:
        raise ValueError(f"unknown field(s) {unknown}; allowed: {sorted(FIELDS)}")
    status = obj.get("status")
    if status not in STATUSES:
        raise ValueError(f"'status' must be one of {', '.join(STATUSES)} (got {status!r})")
    metadata = obj.get("metadata")
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise ValueError("'metadata' must be a JSON object")
    meta_text = orjson.dumps(metadata, option=orjson.OPT_SORT_KEYS).decode()
    if len(meta_text) > MAX_METADATA_BYTES:
        raise ValueError(f"'metadata' is larger than {MAX_METADATA_BYTES} bytes")
    row: Row = {
        "outcome_id": _text(obj, "outcome_id", required=False),
        "run_id": _text(obj, "run_id", required=True),
        "workflow": _text(obj, "workflow", required=False),
        "status": status,
        "value_usd": _money(obj, "value_usd"),
        "quality": _number(obj, "quality", 0.0, 1.0),
        "human_minutes": _number(obj, "human_minutes", 0.0, None),
        "ts": _time(obj, now).isoformat(),
        "received_at": now.isoformat(),
        "metadata": meta_text,
    }
    if row["outcome_id"] is None:
        basis = {k: row[k] for k in ("run_id", "workflow", "status", "value_usd", "quality", "human_minutes",
                                     "metadata")}
        basis["ts"] = obj.get("ts")  # the client's, not ours: a retry must hash the same
        row["outcome_id"] = "o_" + hashlib.sha256(orjson.dumps(basis, option=orjson.OPT_SORT_KEYS)).hexdigest()[:32]
    return row


def counted(outcomes: Sequence[Row]) -> dict[str, Row]:
    """The outcome that counts for each run: the latest by `ts` (then by arrival, then id). A run
    escalated and later resolved counts as a success; one resolved and later reopened as failed
    counts as a failure."""
    best: dict[str, Row] = {}
    for o in outcomes:
        k = (str(o["ts"]), str(o.get("received_at") or ""), str(o["outcome_id"]))
        cur = best.get(o["run_id"])
        if cur is None or k > (str(cur["ts"]), str(cur.get("received_at") or ""), str(cur["outcome_id"])):
            best[o["run_id"]] = o
    return best


# -- cost per outcome, baselines, ROI ---------------------------------------------------------------

def tidy(d: Decimal) -> Decimal:
    """Drop trailing zeros (the warehouse's fixed scale) without rounding: normalize() would round
    to the context's 28 digits."""
    text = format(d, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return Decimal(text or "0")


@dataclass(frozen=True, slots=True)
class Baseline:
    """Cost of one successful outcome without margin's LLM path (resolved to USD)."""

    cost_per_outcome: Decimal
    label: str


def human_baseline(minutes: Decimal, hourly_usd: Decimal, label: str = "") -> Baseline:
    return Baseline(minutes * hourly_usd / 60, label or f"{minutes} human minutes at ${hourly_usd}/h")


def baselines(workflows: Iterable[Any]) -> tuple[dict[str, Baseline], dict[str, tuple[datetime, datetime, str]]]:
    """Each configured workflow's baseline (margin.yaml `workflows[].baseline`): fixed ones (a cost per
    outcome, or human minutes at an hourly rate) and, per workflow, the (start, end, label) of a period
    whose own cost per outcome is the baseline. `margin report outcomes` and the dashboard use it."""
    fixed: dict[str, Baseline] = {}
    periods: dict[str, tuple[datetime, datetime, str]] = {}
    for w in workflows:
        b = w.baseline
        if b is None:
            continue
        if b.cost_per_outcome_usd is not None:
            fixed[w.name] = Baseline(b.cost_per_outcome_usd, b.label or "configured")
        elif b.human_minutes is not None and b.hourly_usd is not None:
            fixed[w.name] = human_baseline(b.human_minutes, b.hourly_usd, b.label)
        elif b.period:
            start, end = parse_period(b.period)
            periods[w.name] = (start, end, b.label or f"margin in {b.period}")
    return fixed, periods


def percentile_dec(values: Sequence[Decimal], q: float) -> Decimal | None:
    """Nearest-rank percentile: the value reported was really observed (no interpolation)."""
    if not values:
        return None
    s = sorted(values)
    k = max(0, min(len(s) - 1, math.ceil(q * len(s)) - 1))
    return s[k]


def outcome_metrics(spend: Decimal, successes: int, tokens: int, calls: int, p50_run: Decimal | None = None,
                    p95_run: Decimal | None = None, value: Decimal | None = None,
                    baseline: Baseline | None = None) -> dict[str, Any]:
    """Cost per successful outcome = all spend of the workflow's runs (failed, escalated, retried
    and unreported runs included) / successful outcomes. Exact Decimal; None when nothing succeeded.
    Saving = baseline x successes - spend; ROI = saving / spend."""
    cpo = spend / successes if successes else None
    out: dict[str, Any] = {
        "spend_usd": usd(spend),
        "successes": successes,
        "cost_per_outcome_usd": usd(cpo) if cpo is not None else None,
        "tokens_per_outcome": round(tokens / successes, 2) if successes else None,
        "calls_per_outcome": round(calls / successes, 2) if successes else None,
        "p50_run_cost_usd": _opt(p50_run),
        "p95_run_cost_usd": _opt(p95_run),
        "value_usd": _opt(value),
        "value_roi": _ratio((value - spend) if value is not None else None, spend),
        "baseline": baseline.label if baseline else None,
        "baseline_cost_per_outcome_usd": usd(baseline.cost_per_outcome) if baseline else None,
        "saving_per_outcome_usd": None, "saving_usd": None, "roi": None,
    }
    if baseline is not None and cpo is not None:
        total = baseline.cost_per_outcome * successes - spend
        out.update(saving_per_outcome_usd=usd(baseline.cost_per_outcome - cpo), saving_usd=usd(total),
                   roi=_ratio(total, spend))
    return out


def _opt(d: Decimal | None) -> str | None:
    return usd(d) if d is not None else None


def _ratio(num: Decimal | None, den: Decimal) -> float | None:
    """ROI as a plain ratio for people (saving / spend): a display figure, not money."""
    if num is None or den <= 0:
        return None
    return round(float(num / den), 4)
