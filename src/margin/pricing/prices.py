"""Cost of a call in exact Decimal USD, split by token type.

genai-prices is the reference table, but its `calc_price` looks the model up on every call
(~0.2 ms), too slow for the hot path. So each model's `ModelPrice` is resolved once, and the
arithmetic (including tiered "cliff" prices, which switch ALL tokens to the tier rate once the
prompt crosses the threshold) is done here. tests/test_pricing.py checks it equals genai-prices.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from margin.config import ModelConfig
from margin.domain import ZERO, Cost, Usage

MILLION = Decimal(1_000_000)
SECONDS_PER_HOUR = Decimal(3600)
RATE_QUANTUM = Decimal("1e-10")


class PricingError(Exception):
    """A model's price source cannot be resolved."""


@dataclass(frozen=True, slots=True)
class Rate:
    """USD per million tokens, with optional cliff tiers [(threshold, rate), ...] ascending."""

    base: Decimal
    tiers: tuple[tuple[int, Decimal], ...] = ()

    def at(self, input_tokens: int) -> Decimal:
        rate = self.base
        for start, price in self.tiers:
            if input_tokens > start:
                rate = price
        return rate


@dataclass(frozen=True, slots=True)
class ModelRates:
    """Per-million rates for each token type of one model, and where they came from."""

    input: Rate
    output: Rate
    cache_read: Rate
    cache_write: Rate
    source: str

    def cost(self, usage: Usage) -> Cost:
        n = usage.input_tokens
        return Cost(
            input_usd=usage.uncached_input_tokens * self.input.at(n) / MILLION,
            cache_read_usd=usage.cached_input_tokens * self.cache_read.at(n) / MILLION,
            cache_write_usd=usage.cache_write_tokens * self.cache_write.at(n) / MILLION,
            output_usd=usage.output_tokens * self.output.at(n) / MILLION,
            price_source=self.source,
        )

    def worst_case(self, input_tokens: int, output_tokens: int) -> Decimal:
        """Upper bound of a call's cost: every input token uncached, at the tier it lands in."""
        return self.cost(Usage(input_tokens=input_tokens, output_tokens=output_tokens)).total_usd


def _rate(value: Any) -> Rate | None:
    if value is None:
        return None
    if isinstance(value, Decimal):
        return Rate(value)
    # genai_prices.types.TieredPrices
    return Rate(Decimal(value.base), tuple((int(t.start), Decimal(t.price)) for t in value.tiers))


def genai_rates(ref: str, when: datetime | None = None) -> ModelRates:
    """Resolve `model` or `provider/model` through the bundled genai-prices table (offline)."""
    import genai_prices  # imported lazily: loading the snapshot takes ~30 ms

    provider, _, model = ref.rpartition("/")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            calc = genai_prices.calc_price(
                genai_prices.Usage(input_tokens=1, output_tokens=1),
                model,
                provider_id=provider or None,
                genai_request_timestamp=when,
            )
    except LookupError as e:
        raise PricingError(f"genai-prices has no price for {ref!r}: {e}") from None
    mp = calc.model_price
    inp = _rate(getattr(mp, "input_mtok", None)) or Rate(ZERO)
    out = _rate(getattr(mp, "output_mtok", None)) or Rate(ZERO)
    # A model with no cache price bills cached tokens as plain input, as the provider does.
    cread = _rate(getattr(mp, "cache_read_mtok", None)) or inp
    cwrite = _rate(getattr(mp, "cache_write_mtok", None)) or inp
    source = f"genai-prices {genai_prices.__version__}: {calc.provider.id}/{calc.model.id}"
    return ModelRates(inp, out, cread, cwrite, source)


def model_rates(m: ModelConfig) -> ModelRates:
    """The rates a configured model is billed at. No price configured means free (and says so)."""
    p = m.price
    if p is None:
        return ModelRates(Rate(ZERO), Rate(ZERO), Rate(ZERO), Rate(ZERO), "unpriced")
    if p.genai_prices is not None:
        return genai_rates(p.genai_prices)
    if p.per_million is not None:
        pm = p.per_million
        inp = Rate(pm.input)
        return ModelRates(
            inp,
            Rate(pm.output),
            Rate(pm.cache_read) if pm.cache_read is not None else inp,
            Rate(pm.cache_write) if pm.cache_write is not None else inp,
            "config: per_million",
        )
    assert p.self_hosted is not None and m.throughput is not None  # guaranteed by config validation
    # Self-hosted: a token costs the GPU time it occupies. Prefill is far faster than decode,
    # so input tokens are priced at the prefill rate (default 10x the decode rate).
    usd_per_s = p.self_hosted.gpu_hour_usd * p.self_hosted.gpus / SECONDS_PER_HOUR
    out_tps = Decimal(str(m.throughput.output_tokens_per_s))
    in_tps = Decimal(str(m.throughput.input_tokens_per_s or m.throughput.output_tokens_per_s * 10))
    # $/h over 3600 s over tokens/s rarely terminates; a rate exact to 1e-10 $/MTok keeps every
    # ledger amount a finite decimal at no practical loss.
    inp = Rate((usd_per_s * MILLION / in_tps).quantize(RATE_QUANTUM))
    out = Rate((usd_per_s * MILLION / out_tps).quantize(RATE_QUANTUM))
    return ModelRates(inp, out, inp, inp, "config: self_hosted")


def energy_joules(m: ModelConfig, usage: Usage) -> float | None:
    """Energy of a call from the model's power draw and measured throughput, if configured."""
    if m.power_watts is None or m.throughput is None:
        return None
    out_tps = m.throughput.output_tokens_per_s
    in_tps = m.throughput.input_tokens_per_s or out_tps * 10
    gpus = m.price.self_hosted.gpus if m.price and m.price.self_hosted else 1
    seconds = usage.input_tokens / in_tps + usage.output_tokens / out_tps
    return m.power_watts * gpus * seconds


class PriceBook:
    """Rates for every configured model, resolved once at start-up."""

    def __init__(self, models: list[ModelConfig]):
        self._models = {m.name: m for m in models}
        self._rates = {m.name: model_rates(m) for m in models}

    @property
    def models(self) -> frozenset[str]:
        return frozenset(self._rates)

    def rates(self, model: str) -> ModelRates:
        return self._rates[model]

    def cost(self, model: str, usage: Usage) -> Cost:
        return self._rates[model].cost(usage)

    def energy(self, model: str, usage: Usage) -> float | None:
        return energy_joules(self._models[model], usage)
