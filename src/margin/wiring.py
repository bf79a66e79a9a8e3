"""margin.yaml -> the domain records the policies take: budgets, rate limits, run caps, route
targets and groups. The gateway and the replay simulator both build their policy inputs here, so a
replay runs exactly what the gateway would (DESIGN.md: the same policy code, fed the same way)."""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal

from margin.config import (
    BudgetConfig,
    CompressConfig,
    Config,
    GroupConfig,
    ModelConfig,
    ProviderConfig,
    RateLimitConfig,
    RunCapConfig,
)
from margin.domain.budget import Budget, BudgetUnit, RateLimit, RunCap, Threshold, duration_s
from margin.policy.compress import CompressPolicy
from margin.policy.route import RESPONSES_STATE, Group, Rule, Target
from margin.pricing import ModelRates, PriceBook


def to_budget(c: BudgetConfig) -> Budget:
    unit: BudgetUnit = "usd" if c.limit_usd is not None else "tokens"
    limit = c.limit_usd if c.limit_usd is not None else Decimal(c.limit_tokens or 0)
    return Budget(
        id=c.id, name=c.name, limit=limit, unit=unit, scope=tuple(sorted(c.scope.items())), period=c.period,
        timezone=c.timezone, rolling_s=duration_s(c.rolling) if c.rolling else 0, custom_start=c.start,
        custom_end=c.end, webhook=c.webhook,
        thresholds=tuple(Threshold(t.at, t.action, tuple(t.map.items()), t.priority) for t in c.thresholds),
    )


def to_rate_limit(c: RateLimitConfig) -> RateLimit:
    return RateLimit(c.id, tuple(sorted(c.scope.items())), c.rpm, c.tpm)


def to_run_cap(c: RunCapConfig) -> RunCap:
    return RunCap(c.id, tuple(sorted(c.scope.items())), c.max_calls, c.max_tool_calls, c.max_usd, c.max_wall_s,
                  c.max_repeats, c.on_cap, c.webhook, c.run_ttl_s)


def targets(models: Sequence[ModelConfig], providers: Sequence[ProviderConfig], prices: PriceBook) -> dict[str, Target]:
    native = {p.name for p in providers if p.responses_native}
    return {m.name: target(m, prices.rates(m.name), m.provider in native) for m in models}


def target(m: ModelConfig, rates: ModelRates, responses_native: bool = True) -> Target:
    """A servable model as routing sees it (list prices only rank candidates; money is metered).
    A provider with its own /responses also carries what only it can (capability `responses_state`)."""
    caps = frozenset(m.capabilities) | ({RESPONSES_STATE} if responses_native else frozenset())
    return Target(m.name, m.provider, m.upstream_id, context_window=m.context_window,
                  capabilities=caps, tiers=frozenset(m.tiers), quality=m.quality,
                  input_per_mtok=float(rates.input.base), output_per_mtok=float(rates.output.base),
                  fallbacks=tuple(m.fallbacks))


def group(g: GroupConfig) -> Group:
    return Group(g.name, tuple(g.candidates), g.strategy,
                 tuple(Rule(r.model, tuple(sorted(r.tags.items())), r.key, r.team, r.tier, r.tools,
                            r.prompt_tokens_gt, r.prompt_tokens_lte) for r in g.rules),
                 tuple(g.weights.items()), g.verify_regex, g.verify_json, g.reference,
                 g.verify_min_logprob, g.verify_judge, g.judge_instructions, g.verifier)


def compression_routes(cfg: Config) -> dict[str, CompressConfig]:
    """Route name (a model or a group) -> its compression settings, for routes that opted in."""
    out = {m.name: m.compress for m in cfg.models if m.compress is not None}
    out.update({g.name: g.compress for g in cfg.groups if g.compress is not None})
    return out


def compress_policy(c: CompressConfig) -> CompressPolicy:
    return CompressPolicy(c.max_input_tokens, c.dedupe_tool_outputs, c.dedupe_paragraphs, c.min_paragraph_chars,
                          c.block)
