"""Plain typed records that cross room boundaries. No I/O here: only data and arithmetic."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal

ZERO = Decimal(0)


def usd(amount: Decimal) -> str:
    """Exact decimal text, never scientific notation ("0.00000006", not "6E-8")."""
    return format(amount, "f")

Endpoint = Literal["chat", "completion", "embedding", "response", "batch"]
UsageSource = Literal["provider", "estimated"]


@dataclass(frozen=True, slots=True)
class Attribution:
    """Who a call is charged to. Comes from the virtual key, refined by request headers."""

    org: str = ""
    team: str = ""
    user: str = ""
    app: str = ""
    env: str = ""
    key_id: str = ""
    tags: tuple[tuple[str, str], ...] = ()

    @property
    def tag_map(self) -> dict[str, str]:
        return dict(self.tags)


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts by type. `input_tokens` includes cached reads and cache writes and
    `output_tokens` includes reasoning (the OpenTelemetry and genai-prices convention)."""

    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    source: UsageSource = "provider"

    @property
    def uncached_input_tokens(self) -> int:
        return max(0, self.input_tokens - self.cached_input_tokens - self.cache_write_tokens)

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


@dataclass(frozen=True, slots=True)
class Cost:
    """USD by token type, exact Decimals. Rounded only for display."""

    input_usd: Decimal = ZERO
    cache_read_usd: Decimal = ZERO
    cache_write_usd: Decimal = ZERO
    output_usd: Decimal = ZERO
    price_source: str = ""

    @property
    def total_usd(self) -> Decimal:
        return self.input_usd + self.cache_read_usd + self.cache_write_usd + self.output_usd


@dataclass(frozen=True, slots=True)
class Call:
    """What the client asked for, summarised for policy decisions (the body stays in the shell)."""

    endpoint: Endpoint
    requested_model: str
    stream: bool
    attribution: Attribution
    prompt_tokens_estimate: int = 0
    max_tokens: int | None = None
    run_id: str = ""
    workflow: str = ""
    agent: str = ""
    step: str = ""
    tool: str = ""
    tier: str = ""
    priority: str = ""
    has_tools: bool = False


@dataclass(frozen=True, slots=True)
class RouteDecision:
    """Which configured model serves a call, and why (recorded in the ledger and a header)."""

    model: str
    provider: str
    upstream_model: str
    reason: str
    downgraded_from: str = ""
    fallbacks: tuple[str, ...] = ()  # models to try next, in order, if this one fails


@dataclass(slots=True)
class Event:
    """One ledger row: an upstream call, a cache hit, or a refused request."""

    event_id: str
    ts_start: datetime
    ts_end: datetime
    request_id: str
    endpoint: str
    attribution: Attribution
    requested_model: str
    model: str = ""
    provider: str = ""
    tier: str = ""
    route_reason: str = ""
    parent_event_id: str = ""
    run_id: str = ""
    step: str = ""
    workflow: str = ""
    agent: str = ""
    tool: str = ""
    usage: Usage = field(default_factory=Usage)
    cost: Cost = field(default_factory=Cost)
    lever: str = ""
    avoided_cost_usd: Decimal = ZERO
    tokens_saved: int = 0
    latency_ms: float = 0.0
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    status: int = 200
    error_type: str = ""
    cache_hit: str = ""
    stream: bool = False
    energy_j: float | None = None
    actions: list[dict[str, Any]] = field(default_factory=list)
    tool_calls: int = 0  # tool calls the answer asked the client to run (agent steps to come)


@dataclass(frozen=True, slots=True)
class VirtualKey:
    """A client credential. Only the SHA-256 of the secret is ever stored."""

    key_id: str
    key_hash: str
    prefix: str
    created_at: datetime
    name: str = ""
    org: str = ""
    team: str = ""
    user: str = ""
    app: str = ""
    env: str = ""
    models: tuple[str, ...] = ()  # empty: every model
    tags: tuple[tuple[str, str], ...] = ()
    revoked_at: datetime | None = None

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    def attribution(self) -> Attribution:
        return Attribution(self.org, self.team, self.user, self.app, self.env, self.key_id, self.tags)
