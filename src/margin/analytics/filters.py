"""Filters every warehouse query takes, and the SQL they become.

A team viewer's restriction is part of the SQL of every query (`team = ?` on the events scanned),
never a filter applied to results afterwards."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

DIMENSIONS = ("org", "team", "user", "app", "env", "key_id", "model", "requested_model", "provider", "endpoint",
              "workflow", "run_id", "agent", "tool", "step", "tier", "status", "usage_source", "error_type",
              "lever", "cache_hit")
BUCKETS = ("hour", "day", "week", "month")
_TAG = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_SINCE = re.compile(r"^(\d+)([mhdw])$")
_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """`30m`, `24h`, `7d`, `2w`, or an ISO date/time (UTC if no zone)."""
    now = now or datetime.now(UTC)
    m = _SINCE.match(text.strip())
    if m:
        return now - timedelta(**{_UNITS[m.group(2)]: int(m.group(1))})
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"--since {text!r}: use 30m, 24h, 7d, 2w or an ISO date like 2026-11-01") from None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def parse_period(text: str) -> tuple[datetime, datetime]:
    """`2026-11` -> [2026-11-01, 2026-12-01) UTC; `2026-11-05` -> that day."""
    try:
        if len(text) == 7:
            start = datetime.strptime(text, "%Y-%m").replace(tzinfo=UTC)
            end = (start + timedelta(days=32)).replace(day=1)
            return start, end
        start = datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=UTC)
        return start, start + timedelta(days=1)
    except ValueError:
        raise ValueError(f"period {text!r}: use YYYY-MM (a month) or YYYY-MM-DD (a day)") from None


def check_dimension(d: str) -> str:
    if d in DIMENSIONS or d in BUCKETS:
        return d
    if d.startswith("tag:") and _TAG.match(d[4:]):
        return d
    raise ValueError(f"dimension {d!r}: choose from {', '.join(DIMENSIONS + BUCKETS)} or tag:<name> "
                     "(letters, digits, _ . -)")


def dim_sql(d: str, alias: str = "") -> str:
    """SQL for a dimension (validated first, so it is safe to inline)."""
    check_dimension(d)
    p = f"{alias}." if alias else ""
    if d in BUCKETS:
        return f"date_trunc('{d}', {p}ts_start)"
    if d.startswith("tag:"):
        return f"coalesce(json_extract_string({p}tags, '$.\"{d[4:]}\"'), '')"
    if d == "model":  # refused before any model was called: say what was asked
        return (f"CASE WHEN coalesce({p}model, '') = '' AND coalesce({p}requested_model, '') <> '' "
                f"THEN {p}requested_model || ' (not served)' ELSE coalesce({p}model, '') END")
    if d == "status":
        return f"{p}status"
    return f"coalesce({p}\"{d}\", '')"


def _naive(t: datetime) -> datetime:
    return t.astimezone(UTC).replace(tzinfo=None) if t.tzinfo else t


@dataclass(frozen=True, slots=True)
class Filter:
    """A time range [since, until) on `ts_start`, an optional team restriction (a team viewer sees
    only its team's rows) and equality filters by dimension, e.g. (("model", "gpt-4o"),)."""

    since: datetime | None = None
    until: datetime | None = None
    team: str | None = None
    where: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        for d, _ in self.where:
            if d in BUCKETS:
                raise ValueError(f"cannot filter on {d!r}: use since/until")
            check_dimension(d)

    def sql(self, alias: str = "", time: bool = True) -> tuple[str, list[Any]]:
        """`cond AND cond ...` (never empty: starts with TRUE) and its parameters."""
        p = f"{alias}." if alias else ""
        conds: list[str] = ["TRUE"]
        params: list[Any] = []
        if self.team is not None:
            conds.append(f"{p}team = ?")
            params.append(self.team)
        if time and self.since is not None:
            conds.append(f"{p}ts_start >= ?")
            params.append(_naive(self.since))
        if time and self.until is not None:
            conds.append(f"{p}ts_start < ?")
            params.append(_naive(self.until))
        for d, v in self.where:
            conds.append(f"CAST({dim_sql(d, alias)} AS VARCHAR) = ?")
            params.append(v)
        return " AND ".join(conds), params

    def range_params(self) -> list[Any]:
        lo = _naive(self.since) if self.since else datetime(1970, 1, 1)
        hi = _naive(self.until) if self.until else datetime(9999, 1, 1)
        return [lo, hi]
