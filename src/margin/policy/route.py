"""Which configured model serves a call, and what to fall back to. Pure: plain data in (the call,
the catalogue, groups, which providers' circuits are open, a random draw), a decision out.

A request for a concrete model is served as asked (unless its provider's circuit is open and it
has fallbacks). A request for a group is routed among the group's candidates that *fit*: allowed
for the key, serving the endpoint, with room in the context window, the capabilities the request
needs, the SLA tier asked for, and a closed circuit."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from margin.domain import Call, RouteDecision

# What a Responses call needs from a provider that serves /responses itself: stored state
# (previous_response_id, conversation) and built-in tools do not survive translation to chat.
RESPONSES_STATE = "responses_state"


@dataclass(frozen=True, slots=True)
class Target:
    """A servable model: public name, provider, the id the provider knows it by, and what
    routing needs to know about it."""

    model: str
    provider: str
    upstream_model: str
    endpoints: frozenset[str] = frozenset({"chat", "completion", "embedding", "response"})
    context_window: int = 1 << 30
    capabilities: frozenset[str] = frozenset({"tools", "json"})
    tiers: frozenset[str] = frozenset({"premium", "standard", "batch"})
    quality: float = 0.5
    input_per_mtok: float = 0.0
    output_per_mtok: float = 0.0
    fallbacks: tuple[str, ...] = ()

    def est_cost(self, prompt_tokens: int, output_tokens: int) -> float:
        """For ranking only (money is metered in Decimal)."""
        return (prompt_tokens * self.input_per_mtok + output_tokens * self.output_per_mtok) / 1e6


@dataclass(frozen=True, slots=True)
class Rule:
    model: str
    tags: tuple[tuple[str, str], ...] = ()
    key: str | None = None
    team: str | None = None
    tier: str | None = None
    tools: bool | None = None
    prompt_tokens_gt: int | None = None
    prompt_tokens_lte: int | None = None

    def matches(self, call: Call, need: Need) -> bool:
        a = call.attribution
        tags = dict(a.tags)
        return (all(tags.get(k) == v for k, v in self.tags)
                and (self.key is None or a.key_id == self.key)
                and (self.team is None or a.team == self.team)
                and (self.tier is None or need.tier == self.tier)
                and (self.tools is None or call.has_tools == self.tools)
                and (self.prompt_tokens_gt is None or need.prompt_tokens > self.prompt_tokens_gt)
                and (self.prompt_tokens_lte is None or need.prompt_tokens <= self.prompt_tokens_lte))

    def describe(self) -> str:
        parts = [f"{k}={v}" for k, v in self.tags]
        for name in ("key", "team", "tier", "tools", "prompt_tokens_gt", "prompt_tokens_lte"):
            v = getattr(self, name)
            if v is not None:
                parts.append(f"{name}={v}")
        return ",".join(parts) or "always"


@dataclass(frozen=True, slots=True)
class Group:
    name: str
    candidates: tuple[str, ...]
    strategy: str = "cheapest"
    rules: tuple[Rule, ...] = ()
    weights: tuple[tuple[str, float], ...] = ()
    verify_regex: str | None = None
    verify_json: bool = False
    reference: str | None = None  # what routing's savings are measured against (default: strongest)
    verify_min_logprob: float | None = None
    verify_judge: str | None = None
    judge_instructions: str | None = None
    verifier: str | None = None  # a learned cascade verifier's artefact (loaded by the shell)


@dataclass(frozen=True, slots=True)
class Need:
    """What the request requires of a model."""

    prompt_tokens: int = 0
    max_output: int = 0
    capabilities: frozenset[str] = frozenset()
    tier: str = ""


@dataclass(frozen=True, slots=True)
class Refusal:
    status: int
    code: str
    message: str
    param: str | None = None


@dataclass(frozen=True, slots=True)
class Health:
    open_providers: frozenset[str] = frozenset()
    latency_ms: tuple[tuple[str, float], ...] = ()  # measured, smoothed latency per model


@dataclass(frozen=True, slots=True)
class Learned:
    """A learned router's verdict for this prompt: the model it picked and why."""

    model: str
    reason: str


@dataclass(slots=True)
class _Fit:
    fits: list[Target] = field(default_factory=list)
    why_not: list[str] = field(default_factory=list)


def _fit(names: Sequence[str], targets: Mapping[str, Target], call: Call, need: Need, allowed: tuple[str, ...],
         health: Health) -> _Fit:
    f = _Fit()
    for n in names:
        t = targets[n]
        if allowed and n not in allowed:
            f.why_not.append(f"{n}: not allowed for this key")
        elif call.endpoint not in t.endpoints:
            f.why_not.append(f"{n}: no {call.endpoint} endpoint")
        elif need.prompt_tokens + need.max_output > t.context_window:
            f.why_not.append(f"{n}: context {t.context_window} < {need.prompt_tokens + need.max_output}")
        elif not need.capabilities <= t.capabilities:
            f.why_not.append(f"{n}: lacks {','.join(sorted(need.capabilities - t.capabilities))}")
        elif need.tier and need.tier not in t.tiers:
            f.why_not.append(f"{n}: not in tier {need.tier}")
        elif t.provider in health.open_providers:
            f.why_not.append(f"{n}: circuit open on {t.provider}")
        else:
            f.fits.append(t)
    return f


def _cheapest(fits: Sequence[Target], need: Need) -> Target:
    return min(fits, key=lambda t: (t.est_cost(need.prompt_tokens, need.max_output), -t.quality, t.model))


def _chain(chosen: Target, fits: Sequence[Target], targets: Mapping[str, Target], need: Need) -> tuple[str, ...]:
    """Configured fallbacks first, then the group's other fitting candidates, cheapest first."""
    rest = [t for t in sorted(fits, key=lambda t: t.est_cost(need.prompt_tokens, need.max_output))
            if t.model != chosen.model]
    order = [f for f in chosen.fallbacks if f in targets] + [t.model for t in rest]
    return tuple(dict.fromkeys(m for m in order if m != chosen.model))


def _decision(t: Target, reason: str, fallbacks: tuple[str, ...]) -> RouteDecision:
    return RouteDecision(model=t.model, provider=t.provider, upstream_model=t.upstream_model, reason=reason,
                         fallbacks=fallbacks)


def reference(group: Group, targets: Mapping[str, Target]) -> str:
    """The model a group's routing savings are measured against: the configured one, else the
    strongest candidate (the dearer on a tie): what a team would send everything to unrouted."""
    if group.reference is not None:
        return group.reference
    return max(group.candidates, key=lambda m: (targets[m].quality, targets[m].est_cost(1000, 1000), m))


def decide(call: Call, targets: Mapping[str, Target], allowed: tuple[str, ...],
           groups: Mapping[str, Group] | None = None, need: Need | None = None, health: Health | None = None,
           draw: float = 0.0, learned: Learned | None = None) -> RouteDecision | Refusal:
    """`draw` is a uniform random number in [0, 1) for weighted choice (an argument, so this stays pure)."""
    need = need or Need()
    health = health or Health()
    group = (groups or {}).get(call.requested_model)
    if group is None:
        return _concrete(call, targets, allowed, need, health)
    f = _fit(group.candidates, targets, call, need, allowed, health)
    if not f.fits:
        return Refusal(400 if not health.open_providers else 503, "no_model_fits",
                       f"No model of group '{group.name}' can serve this request: {'; '.join(f.why_not)}", "model")
    fits = f.fits
    chosen, reason = None, ""
    if need.tier == "premium":
        chosen = max(fits, key=lambda t: (t.quality, -t.est_cost(need.prompt_tokens, need.max_output)))
        reason = "tier premium: strongest fitting"
    elif need.tier == "batch":
        chosen, reason = _cheapest(fits, need), "tier batch: cheapest fitting"
    elif group.strategy == "rules":
        for i, rule in enumerate(group.rules, 1):
            t = next((x for x in fits if x.model == rule.model), None)
            if t is not None and rule.matches(call, need):
                chosen, reason = t, f"rule {i} ({rule.describe()})"
                break
    elif group.strategy == "weighted":
        weights = dict(group.weights)
        pool = [(t, weights.get(t.model, 1.0)) for t in fits if weights.get(t.model, 1.0) > 0]
        total = sum(w for _, w in pool)
        acc = 0.0
        for t, w in pool:
            acc += w / total
            if draw < acc:
                chosen, reason = t, f"weighted {w:g}/{total:g}"
                break
        chosen = chosen or pool[-1][0]
    elif group.strategy == "least-latency":
        measured = dict(health.latency_ms)
        # Unmeasured models first (they need a measurement), then the fastest.
        chosen = min(fits, key=lambda t: (t.model in measured, measured.get(t.model, 0.0), t.model))
        reason = (f"least latency ({measured[chosen.model]:.0f} ms)" if chosen.model in measured
                  else "least latency (not yet measured)")
    elif group.strategy == "learned" and learned is not None:
        chosen = next((t for t in fits if t.model == learned.model), None)
        reason = f"learned: {learned.reason}"
    elif group.strategy == "cascade":
        chosen, reason = _cheapest(fits, need), "cascade step 1: cheapest fitting"
    if chosen is None:
        chosen = _cheapest(fits, need)
        reason = reason or f"cheapest of {len(fits)} fitting" if group.strategy != "rules" else "no rule: cheapest"
    return _decision(chosen, f"group {group.name}: {reason}", _chain(chosen, fits, targets, need))


def _concrete(call: Call, targets: Mapping[str, Target], allowed: tuple[str, ...], need: Need,
              health: Health) -> RouteDecision | Refusal:
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
    # A fallback must be able to serve the call (its endpoint, what it needs: tools, vision, state).
    fallbacks = tuple(m for m in t.fallbacks if m in targets and (not allowed or m in allowed)
                      and call.endpoint in targets[m].endpoints and need.capabilities <= targets[m].capabilities)
    if t.provider in health.open_providers and fallbacks:
        first = targets[fallbacks[0]]
        return _decision(first, f"circuit open on {t.provider}: fallback from {t.model}", fallbacks[1:])
    return _decision(t, "requested", fallbacks)
