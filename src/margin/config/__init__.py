"""`margin.yaml`: one pydantic model tree, validated at start-up, secrets as ${ENV_VAR}."""

from __future__ import annotations

import os
import re
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from margin.config.base import _ENV, SCOPE_DIMENSIONS, Capability, ConfigError, Tier, _Strict
from margin.config.budgets import BudgetConfig, RateLimitConfig, RunCapConfig, ThresholdConfig
from margin.config.models import ModelConfig, PerMillion, Price, SelfHosted, Throughput
from margin.config.outcomes import BaselineConfig, WorkflowConfig
from margin.config.providers import POOL_KINDS, AutoscaleConfig, PoolConfig, ProviderConfig, ReplicaConfig
from margin.config.routes import (
    BreakerConfig,
    CompressConfig,
    GroupConfig,
    RetryConfig,
    RuleConfig,
    SemanticRouteConfig,
)
from margin.config.runtime import (
    BatchLaneConfig,
    CacheConfig,
    LedgerConfig,
    LimitsConfig,
    SemanticCacheConfig,
    TelemetryConfig,
)

__all__ = [
    "POOL_KINDS", "SCOPE_DIMENSIONS", "AutoscaleConfig", "BaselineConfig", "BatchLaneConfig", "BreakerConfig",
    "BudgetConfig", "CacheConfig", "Capability", "CompressConfig", "Config", "ConfigError", "GroupConfig",
    "LedgerConfig", "LimitsConfig", "ModelConfig", "PerMillion", "PoolConfig", "Price", "ProviderConfig",
    "RateLimitConfig", "ReplicaConfig", "RetryConfig", "RuleConfig", "RunCapConfig", "SelfHosted",
    "SemanticCacheConfig", "SemanticRouteConfig", "TelemetryConfig", "ThresholdConfig", "Throughput", "Tier",
    "WorkflowConfig", "load_config", "parse_config", "read_yaml",
]


class Config(_Strict):
    admin_key: str | None = None
    providers: list[ProviderConfig]
    models: list[ModelConfig]
    ledger: LedgerConfig = LedgerConfig()
    telemetry: TelemetryConfig = TelemetryConfig()
    limits: LimitsConfig = LimitsConfig()
    key_cache_ttl_s: float = Field(default=0.5, ge=0)  # capped at 0.5 s: revocation everywhere within 1 s
    # Budgets and rate limits. `state` is "memory" (one replica) or a redis:// URL (shared).
    state: str = "memory"
    state_failure: Literal["closed", "open"] = "closed"
    fail_open_allowance_usd: Decimal = Decimal("1")
    budgets: list[BudgetConfig] = Field(default_factory=list)
    rate_limits: list[RateLimitConfig] = Field(default_factory=list)
    run_caps: list[RunCapConfig] = Field(default_factory=list)
    budget_refresh_s: float = Field(default=1.0, gt=0)
    # A reservation lapses this long after its provider's timeout, so a replica that died mid-call
    # cannot hold budget forever (long enough for a slow call to settle first).
    reservation_grace_s: float = Field(default=60.0, ge=1)
    cache: CacheConfig = CacheConfig()
    semantic_cache: SemanticCacheConfig = SemanticCacheConfig()
    # Routing
    groups: list[GroupConfig] = Field(default_factory=list)
    retry: RetryConfig = RetryConfig()
    circuit_breaker: BreakerConfig = BreakerConfig()
    batch_lane: BatchLaneConfig = BatchLaneConfig()
    # Outcomes and baselines (analytics)
    workflows: list[WorkflowConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_workflows(self) -> Config:
        names = [w.name for w in self.workflows]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"workflow names must be unique; repeated: {dup}")
        return self

    @model_validator(mode="after")
    def _references(self) -> Config:
        names = [p.name for p in self.providers]
        if len(set(names)) != len(names):
            raise ValueError("provider names must be unique")
        models = [m.name for m in self.models]
        if len(set(models)) != len(models):
            raise ValueError("model names must be unique")
        for m in self.models:
            if m.provider not in names:
                raise ValueError(f"model {m.name!r} names unknown provider {m.provider!r}; known: {names}")
        for kind, ids in (("budget", [b.id for b in self.budgets]), ("rate limit", [r.id for r in self.rate_limits]),
                          ("run cap", [c.id for c in self.run_caps])):
            dup = sorted({i for i in ids if ids.count(i) > 1})
            if dup:
                raise ValueError(f"{kind} ids must be unique; repeated: {dup}")
        known = set(models)
        for g in self.groups:
            if g.name in known:
                raise ValueError(f"group {g.name!r} has the name of a model")
            missing = [c for c in g.candidates if c not in known]
            missing += [r.model for r in g.rules if r.model not in known]
            if missing:
                raise ValueError(f"group {g.name!r} names unknown model(s) {missing}")
            if g.verifier is not None and g.strategy != "cascade":
                raise ValueError(f"group {g.name!r}: `verifier` is for strategy cascade")
            if g.verify_judge is not None and g.verify_judge not in known:
                raise ValueError(f"group {g.name!r}: unknown judge model {g.verify_judge!r}")
            if g.reference is not None and g.reference not in known:
                raise ValueError(f"group {g.name!r}: unknown reference model {g.reference!r}")
            if g.strategy == "learned" and not g.router:
                raise ValueError(f"group {g.name!r}: strategy learned needs `router` (an artefact path)")
        routes: list[ModelConfig | GroupConfig] = [*self.models, *self.groups]
        for r in routes:
            summariser = r.compress.summarise_with if r.compress else None
            if summariser is not None and summariser not in known:
                raise ValueError(f"{r.name!r}: compress.summarise_with names unknown model {summariser!r}")
        for m in self.models:
            bad = [f for f in m.fallbacks if f not in known]
            if bad:
                raise ValueError(f"model {m.name!r}: unknown fallback(s) {bad}")
        for name, value in (("state", self.state), ("semantic_cache.backend", self.semantic_cache.backend)):
            if not (value == "memory" or value.startswith(("redis://", "rediss://", "unix://"))):
                raise ValueError(f"{name} must be 'memory' or a redis:// URL, not {value!r}")
        return self

    def model(self, name: str) -> ModelConfig | None:
        return next((m for m in self.models if m.name == name), None)


def _expand(value: Any, where: str) -> Any:
    if isinstance(value, str):

        def sub(m: re.Match[str]) -> str:
            var, default = m.group(1), m.group(2)
            if var in os.environ:
                return os.environ[var]
            if default is not None:
                return default
            raise ConfigError(f"{where}: environment variable {var} is not set")

        return _ENV.sub(sub, value)
    if isinstance(value, dict):
        return {k: _expand(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, f"{where}[{i}]") for i, v in enumerate(value)]
    return value


def parse_config(data: Any, source: str = "config") -> Config:
    """Validate an already-loaded mapping; ${VAR} and ${VAR:-default} are expanded in strings."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    try:
        return Config.model_validate(_expand(data, source))
    except ValidationError as e:
        lines = [f"{source}: invalid configuration"]
        for err in e.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
            lines.append(f"  {loc}: {err['msg']}")
        raise ConfigError("\n".join(lines)) from None


def read_yaml(path: str | Path) -> Any:
    """A YAML file's contents, or a ConfigError saying why not."""
    p = Path(path)
    try:
        return yaml.safe_load(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None


def load_config(path: str | Path) -> Config:
    return parse_config(read_yaml(path), str(path))
