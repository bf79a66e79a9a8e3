"""Which configured model serves a call. Pure: plain data in, a decision (or refusal) out.

For now a request for a concrete model is served as asked, if the key may use it. Model groups,
rules, tiers and the learned router (issue 4) extend `decide` without changing its shape."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from margin.domain import Call, RouteDecision


@dataclass(frozen=True, slots=True)
class Target:
    """A servable model: its public name, provider and the id the provider knows it by."""

    model: str
    provider: str
    upstream_model: str
    endpoints: frozenset[str] = frozenset({"chat", "completion", "embedding"})


@dataclass(frozen=True, slots=True)
class Refusal:
    status: int
    code: str
    message: str
    param: str | None = None


def decide(call: Call, targets: Mapping[str, Target], allowed: tuple[str, ...]) -> RouteDecision | Refusal:
    t = targets.get(call.requested_model)
    if t is None:
        known = ", ".join(sorted(targets)) or "none"
        return Refusal(404, "model_not_found",
                       f"The model '{call.requested_model}' does not exist on this gateway (models: {known})", "model")
    if allowed and t.model not in allowed:
        return Refusal(403, "model_not_allowed",
                       f"This key may not use model '{t.model}' (allowed: {', '.join(allowed)})", "model")
    if call.endpoint not in t.endpoints:
        return Refusal(400, "unsupported_endpoint",
                       f"The model '{t.model}' does not serve the {call.endpoint} endpoint", "model")
    return RouteDecision(model=t.model, provider=t.provider, upstream_model=t.upstream_model, reason="requested")
