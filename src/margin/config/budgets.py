"""Budgets, rate limits and agent run caps."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, model_validator

from margin.config.base import SCOPE_DIMENSIONS, _Strict


class ThresholdConfig(_Strict):
    at: Decimal = Field(gt=0, le=100, description="percent of the limit")
    action: Literal["notify", "downgrade", "defer", "block"]
    map: dict[str, str] = Field(default_factory=dict, description="downgrade: model -> lighter model (globs)")
    priority: str = "low"

    @model_validator(mode="after")
    def _map_for_downgrade(self) -> ThresholdConfig:
        if self.action == "downgrade" and not self.map:
            raise ValueError("a downgrade threshold needs `map` (e.g. {gpt-4o: gpt-4o-mini})")
        return self


class BudgetConfig(_Strict):
    id: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")
    name: str = ""
    scope: dict[str, str] = Field(default_factory=dict)
    limit_usd: Decimal | None = Field(default=None, gt=0)
    limit_tokens: int | None = Field(default=None, gt=0)
    period: Literal["day", "week", "month", "custom", "rolling"] = "month"
    timezone: str = "UTC"
    rolling: str | None = None  # e.g. "24h", "7d" (period: rolling)
    start: datetime | None = None  # period: custom
    end: datetime | None = None
    thresholds: list[ThresholdConfig] = Field(
        default_factory=lambda: [ThresholdConfig(at=Decimal(100), action="block")])
    webhook: str = ""

    @model_validator(mode="after")
    def _consistent(self) -> BudgetConfig:
        if (self.limit_usd is None) == (self.limit_tokens is None):
            raise ValueError(f"budget {self.id!r}: give exactly one of limit_usd, limit_tokens")
        bad = [d for d in self.scope if d not in SCOPE_DIMENSIONS and not d.startswith("tag:")]
        if bad:
            raise ValueError(f"budget {self.id!r}: unknown scope dimension(s) {bad}; "
                             f"use {', '.join(sorted(SCOPE_DIMENSIONS))} or tag:<name>")
        if self.period == "rolling" and not self.rolling:
            raise ValueError(f"budget {self.id!r}: period rolling needs `rolling`, e.g. 24h")
        if self.period == "custom" and not (self.start and self.end and self.start < self.end):
            raise ValueError(f"budget {self.id!r}: period custom needs start < end")
        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"budget {self.id!r}: unknown time zone {self.timezone!r}") from None
        return self


class RateLimitConfig(_Strict):
    id: str = Field(min_length=1)
    scope: dict[str, str] = Field(default_factory=dict)
    rpm: int = Field(default=0, ge=0)
    tpm: int = Field(default=0, ge=0)


class RunCapConfig(_Strict):
    """Caps on one agent run (calls sharing X-Margin-Run-Id) of the scoped workflow, key, team...
    Every cap given must hold; a run reaching one is stopped (HTTP 429 run_limit_exceeded)."""

    id: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")
    scope: dict[str, str] = Field(default_factory=dict)
    max_calls: int | None = Field(default=None, ge=1, description="LLM calls per run")
    max_tool_calls: int | None = Field(default=None, ge=0, description="tool calls the model issued in the run")
    max_usd: Decimal | None = Field(default=None, gt=0, description="spend per run; no call may exceed it")
    max_wall_s: float | None = Field(default=None, gt=0, description="seconds since the run's first call")
    max_repeats: int | None = Field(default=None, ge=1, description="times one newest message may recur (loops)")
    on_cap: Literal["stop", "escalate"] = "stop"  # escalate: webhook POST (once per run and cap), then stop
    webhook: str = ""
    run_ttl_s: float = Field(default=86400, gt=0, description="a run's counters live this long after its last call")

    @model_validator(mode="after")
    def _something_capped(self) -> RunCapConfig:
        caps = (self.max_calls, self.max_tool_calls, self.max_usd, self.max_wall_s, self.max_repeats)
        if all(c is None for c in caps):
            raise ValueError(f"run cap {self.id!r}: give at least one of max_calls, max_tool_calls, max_usd, "
                             "max_wall_s, max_repeats")
        bad = [d for d in self.scope if d not in SCOPE_DIMENSIONS and not d.startswith("tag:")]
        if bad:
            raise ValueError(f"run cap {self.id!r}: unknown scope dimension(s) {bad}")
        if self.on_cap == "escalate" and not self.webhook:
            raise ValueError(f"run cap {self.id!r}: on_cap escalate needs `webhook`")
        return self
