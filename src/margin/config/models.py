"""Models and their prices (genai-prices, explicit, or self-hosted machine time)."""

from __future__ import annotations

from decimal import Decimal

from pydantic import Field, model_validator

from margin.config.base import Capability, Tier, _all_tiers, _default_capabilities, _Strict
from margin.config.routes import CompressConfig, SemanticRouteConfig


class PerMillion(_Strict):
    """Explicit USD prices per million tokens; they override genai-prices."""

    input: Decimal
    output: Decimal
    cache_read: Decimal | None = None
    cache_write: Decimal | None = None


class SelfHosted(_Strict):
    """A self-hosted model costs its GPUs' time: $/GPU-hour x GPUs over measured throughput."""

    gpu_hour_usd: Decimal
    gpus: int = Field(default=1, ge=1)


class Price(_Strict):
    """Exactly one price source. `genai_prices` is a model reference such as `gpt-4o` or
    `openai/gpt-4o` (provider id before the slash)."""

    genai_prices: str | None = None
    per_million: PerMillion | None = None
    self_hosted: SelfHosted | None = None

    @model_validator(mode="after")
    def _one_source(self) -> Price:
        chosen = [n for n in ("genai_prices", "per_million", "self_hosted") if getattr(self, n) is not None]
        if len(chosen) != 1:
            raise ValueError(f"give exactly one of genai_prices, per_million, self_hosted (got {chosen or 'none'})")
        return self


class Throughput(_Strict):
    """Measured tokens/s of one replica; used for self-hosted prices and energy."""

    output_tokens_per_s: float = Field(gt=0)
    input_tokens_per_s: float | None = Field(default=None, gt=0)


class ModelConfig(_Strict):
    name: str = Field(min_length=1)
    provider: str
    upstream_model: str | None = None
    context_window: int = Field(default=8192, gt=0)
    max_output_tokens: int | None = Field(default=None, gt=0)
    price: Price | None = None
    throughput: Throughput | None = None
    power_watts: float | None = Field(default=None, gt=0)
    capabilities: list[Capability] = Field(default_factory=_default_capabilities)
    tiers: list[Tier] = Field(default_factory=_all_tiers)
    quality: float = Field(default=0.5, ge=0, le=1, description="prior: how strong the model is, 0..1")
    fallbacks: list[str] = Field(default_factory=list, description="models to try, in order, if this one fails")
    compress: CompressConfig | None = None  # opt-in context compression for requests of this model
    semantic_cache: SemanticRouteConfig | None = None  # opt-in semantic cache for requests of this model

    @property
    def upstream_id(self) -> str:
        return self.upstream_model or self.name

    @property
    def output_cap(self) -> int:
        return self.max_output_tokens or min(self.context_window, 16384)

    @model_validator(mode="after")
    def _self_hosted_needs_throughput(self) -> ModelConfig:
        if self.price and self.price.self_hosted and self.throughput is None:
            raise ValueError(f"model {self.name!r}: a self_hosted price needs `throughput`")
        return self


# Self-hosted engines that speak the OpenAI API; margin balances over their replicas (docs/selfhosted.md).
