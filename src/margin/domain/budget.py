"""Budgets, rate limits and the holds they place on shared counters. Plain data, no I/O."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from decimal import ROUND_CEILING, Decimal
from typing import Literal

BudgetUnit = Literal["usd", "tokens", "calls"]  # calls: a count that settles to what was reserved
PeriodKind = Literal["day", "week", "month", "custom", "rolling"]
ActionKind = Literal["notify", "downgrade", "defer", "block"]

_DURATION = re.compile(r"^(\d+)([smhdw])$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def duration_s(text: str) -> int:
    """`30m` -> 1800, `24h` -> 86400, `7d`, `2w`, `45s`: the one way margin reads a duration."""
    m = _DURATION.match(text.strip())
    if not m:
        raise ValueError(f"{text!r} is not a duration like 30m, 24h, 7d")
    return int(m.group(1)) * _SECONDS[m.group(2)]


# Counters hold integers: USD in nano-dollars (Redis' Lua numbers are doubles, exact to 2**53,
# so nano-USD stays exact up to $9M per counter), tokens as tokens.
NANO = Decimal("1e9")


def to_units(amount: Decimal, unit: BudgetUnit) -> int:
    """USD -> nano-USD, rounded up: a counter never under-counts what was spent."""
    if unit != "usd":
        return int(amount)
    return int((amount * NANO).to_integral_value(rounding=ROUND_CEILING))


def from_units(units: int, unit: BudgetUnit) -> Decimal:
    return Decimal(units) / NANO if unit == "usd" else Decimal(units)


@dataclass(frozen=True, slots=True)
class Threshold:
    """At `pct` percent of the limit, do `action`. Downgrade carries a model map (glob
    patterns allowed, e.g. "*-large" -> "*-small"); defer applies to requests of `priority`."""

    pct: Decimal
    action: ActionKind
    downgrade: tuple[tuple[str, str], ...] = ()
    priority: str = "low"


@dataclass(frozen=True, slots=True)
class Budget:
    """A spend limit over a scope. Scope values are exact, or "*" for one counter per distinct
    value (e.g. {"user": "*"}: every user gets this budget). Dimensions: org, team, user, key,
    app, env, workflow, model, provider, tag:<name>."""

    id: str
    limit: Decimal
    unit: BudgetUnit = "usd"
    scope: tuple[tuple[str, str], ...] = ()
    period: PeriodKind = "month"
    timezone: str = "UTC"
    rolling_s: int = 0
    custom_start: datetime | None = None
    custom_end: datetime | None = None
    thresholds: tuple[Threshold, ...] = ()
    webhook: str = ""
    name: str = ""

    @property
    def label(self) -> str:
        return self.name or self.id


@dataclass(frozen=True, slots=True)
class RateLimit:
    """Token buckets per scope: requests per minute and/or tokens per minute."""

    id: str
    scope: tuple[tuple[str, str], ...] = ()
    rpm: int = 0
    tpm: int = 0


@dataclass(frozen=True, slots=True)
class Hold:
    """One counter a request needs room on. kind "budget": spent + reserved + amount <= limit;
    kind "bucket": a token bucket of `limit` capacity refilled `limit` per `window_s`."""

    key: str
    kind: Literal["budget", "bucket"]
    limit: int
    amount: int
    expires_at: float  # epoch seconds when the counter itself may be dropped (window end + slack)
    window_s: float = 0.0  # bucket refill period, or rolling-window length (0: calendar window)
    unit: BudgetUnit = "usd"


@dataclass(frozen=True, slots=True)
class CounterState:
    spent: int = 0
    reserved: int = 0

    def used_fraction(self, limit: int) -> float:
        return (self.spent + self.reserved) / limit if limit > 0 else 1.0


@dataclass(frozen=True, slots=True)
class ReserveResult:
    ok: bool
    failed_key: str = ""
    # Counter state just before this reservation (budgets: spent/reserved; buckets: spent = level).
    states: dict[str, CounterState] = field(default_factory=dict)
    retry_after_s: float = 0.0


@dataclass(frozen=True, slots=True)
class RunCap:
    """Caps on one agent run (all calls sharing a run id) within `scope` (budget dimensions).
    None means "not capped"."""

    id: str
    scope: tuple[tuple[str, str], ...] = ()
    max_calls: int | None = None
    max_tool_calls: int | None = None
    max_usd: Decimal | None = None
    max_wall_s: float | None = None
    max_repeats: int | None = None
    on_cap: Literal["stop", "escalate"] = "stop"
    webhook: str = ""
    ttl_s: float = 86400.0
