"""Typed records shared by every room. Standard library only."""

from margin.domain.records import (
    ZERO,
    Attribution,
    Call,
    Cost,
    Endpoint,
    Event,
    RouteDecision,
    Usage,
    UsageSource,
    VirtualKey,
    usd,
)

__all__ = [
    "ZERO",
    "Attribution",
    "Call",
    "Cost",
    "Endpoint",
    "Event",
    "RouteDecision",
    "Usage",
    "UsageSource",
    "VirtualKey",
    "usd",
]
