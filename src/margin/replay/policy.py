"""A replay policy: the very `margin.yaml` the gateway runs (validated by `parse_config`), plus an
optional `replay:` section, stripped before validation, for what a trace cannot say by itself
(which model or group its requests ask for, attribution, the start date, prefix-cache and batch
assumptions).

The config-to-domain conversions are the gateway's own (`margin.wiring`), so a replay runs exactly
the budgets, limits, targets and groups the gateway would build from the same file."""

from __future__ import annotations

import re
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from margin import wiring
from margin.config import CompressConfig, Config, ConfigError, ModelConfig, parse_config, read_yaml
from margin.policy import route
from margin.pricing import ModelRates, PriceBook, PricingError
from margin.pricing.batch import batch_rates

_DURATION = re.compile(r"^(\d+)([smhdw])$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
DEFAULT_START = datetime.fromisoformat("2026-01-05T00:00:00+00:00")  # a Monday, start of a month's first week


Rate = Annotated[Decimal, Field(ge=0, le=1)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PrefixCache(_Strict):
    """Provider-side prompt caching, simulated from Mooncake `hash_ids`. Defaults follow OpenAI's
    automatic caching: prompts of 1024+ tokens, entries evicted after ~5 minutes unused."""

    enabled: bool = True
    block_tokens: int = Field(default=512, ge=1, description="tokens per hash_ids block (Mooncake: 512)")
    ttl_s: float = Field(default=300.0, gt=0, description="a block unused this long is gone")
    capacity_blocks: int = Field(default=1_000_000, ge=1, description="blocks kept per model (LRU beyond)")
    min_prompt_tokens: int = Field(default=1024, ge=0, description="shorter prompts are never cached")


class ReplaySettings(_Strict):
    model: str | None = Field(default=None, description="what every request asks for (a model or group)")
    model_map: dict[str, str] = Field(default_factory=dict, description="trace model name -> policy name")
    start: datetime | None = Field(default=None, description="wall-clock time of the first request")
    attribution: dict[str, str] = Field(default_factory=dict, description="org, team, user, app, env, key_id, "
                                                                          "workflow defaults")
    tags: dict[str, str] = Field(default_factory=dict, description="default tags (the trace's win)")
    tier: Literal["", "premium", "standard", "batch"] = ""
    priority: str = ""
    batch_share: float = Field(default=0.0, ge=0, le=1, description="share of requests sent as tier batch")
    batch_discount: Decimal | None = Field(default=None, ge=0, lt=1,
                                           description="overrides providers[].batch_discount (no batch price known)")
    temperature: float | None = Field(default=None, description="what requests send where the trace has none")
    max_tokens: int | None = Field(default=None, ge=1)
    prefix_cache: PrefixCache = PrefixCache()
    exact_cache_on_blocks: bool = Field(default=True, description="token-only traces: equal hash_ids and length "
                                                                   "= the same prompt")
    reference_model: str | None = Field(default=None, description="routing savings are measured against it")
    cascade_escalation_rate: Rate | dict[str, Rate] | None = Field(
        default=None, description="share of verified cascade steps that escalate (one rate, or per group); "
                                  "default: the ledger's, where the trace came from `margin export trace`")
    seed: int = 0


ATTRIBUTION_KEYS = frozenset({"org", "team", "user", "app", "env", "key_id", "workflow"})


class Policy:
    """Everything a replay needs from a policy file, resolved once."""

    def __init__(self, cfg: Config, settings: ReplaySettings, name: str = "policy"):
        bad = set(settings.attribution) - ATTRIBUTION_KEYS
        if bad:
            raise ConfigError(f"{name}: replay.attribution: unknown field(s) {sorted(bad)}; "
                              f"use {', '.join(sorted(ATTRIBUTION_KEYS))}")
        self.name, self.cfg, self.settings = name, cfg, settings
        try:
            self.prices = PriceBook(cfg.models)
        except PricingError as e:
            raise ConfigError(f"{name}: {e}") from None
        self.models: dict[str, ModelConfig] = {m.name: m for m in cfg.models}
        self.targets = wiring.targets(cfg.models, cfg.providers, self.prices)
        self.groups = {g.name: wiring.group(g) for g in cfg.groups}
        self.budgets = [wiring.to_budget(b) for b in cfg.budgets]
        self.rate_limits = [wiring.to_rate_limit(r) for r in cfg.rate_limits]
        self.run_caps = [wiring.to_run_cap(c) for c in cfg.run_caps]
        # Route (model or group) -> its compression settings, as the gateway builds them.
        self.compression: dict[str, CompressConfig] = wiring.compression_routes(cfg)
        known = set(self.models) | set(self.groups)
        for what, ref in (("model", settings.model), ("reference_model", settings.reference_model),
                          *(("model_map", v) for v in settings.model_map.values())):
            if ref is not None and ref not in known:
                raise ConfigError(f"{name}: replay.{what} names {ref!r}, which is neither a model nor a group "
                                  f"of this policy (known: {', '.join(sorted(known))})")
        rates = settings.cascade_escalation_rate
        cascades = {g.name for g in cfg.groups if g.strategy == "cascade"}
        if isinstance(rates, dict) and set(rates) - cascades:
            raise ConfigError(f"{name}: replay.cascade_escalation_rate names {sorted(set(rates) - cascades)}, "
                              f"which are not cascade groups of this policy (cascade groups: "
                              f"{', '.join(sorted(cascades)) or 'none'})")
        if settings.reference_model is not None and settings.reference_model not in self.models:
            raise ConfigError(f"{name}: replay.reference_model must be a model, not the group "
                              f"{settings.reference_model!r}")
        self._batch: dict[str, ModelRates] = {}

    @property
    def model_names(self) -> list[str]:
        return list(self.models)

    def batch_rates(self, model: str) -> ModelRates:
        """The provider's batch price (pricing/batch.py), resolved once per model."""
        if model not in self._batch:
            try:
                m = self.models[model]
                # The provider's configured discount, as the gateway's batch lane reads it, unless
                # the replay overrides it.
                provider = next((p for p in self.cfg.providers if p.name == m.provider), None)
                discount = self.settings.batch_discount
                if discount is None and provider is not None:
                    discount = provider.batch_discount
                self._batch[model] = batch_rates(m, discount)
            except PricingError as e:
                raise ConfigError(f"{self.name}: {e} (replay.batch_discount)") from None
        return self._batch[model]

    def reference(self, requested: str) -> str | None:
        """What a request for `requested` costs without routing: the configured reference model,
        else the group's strongest candidate (ties: the dearer), else the model itself."""
        if self.settings.reference_model:
            return self.settings.reference_model
        g = self.groups.get(requested)
        if g is None:
            return requested if requested in self.models else None
        return route.reference(g, self.targets)  # what the gateway measures routing savings against

    def provider_of(self, model: str) -> str:
        m = self.models.get(model)
        return m.provider if m else ""


def load_policy(path: str | Path) -> Policy:
    return policy_from_dict(read_yaml(path), str(path))


def policy_from_dict(data: Any, source: str = "policy") -> Policy:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    body = dict(data)
    raw = body.pop("replay", None) or {}
    cfg = parse_config(body, source)
    try:
        settings = ReplaySettings.model_validate(raw)
    except ValidationError as e:
        lines = [f"{source}: invalid replay section"]
        lines += [f"  replay.{'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors()]
        raise ConfigError("\n".join(lines)) from None
    return Policy(cfg, settings, source)
