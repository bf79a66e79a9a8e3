"""Provider batch prices: what a configured model costs when its requests go through the
provider's batch API (answers within 24 h, typically half price).

Where genai-prices has a batch variant for the model (``price_context={"processing": "batch"}``:
OpenAI, Anthropic, Google and others publish them), that is the price, token type by token type
(some providers halve cache reads too, some keep them at the standard rate). Otherwise a
configured discount applies to every token type, e.g. ``Decimal("0.5")`` for OpenAI's 50%. A
self-hosted model has no provider batch price: deferring work only changes when it runs, so its
rates stay (unless a discount is given). The gateway's batch lane uses this same function."""

from __future__ import annotations

import warnings
from datetime import datetime
from decimal import Decimal

from margin.config import ModelConfig
from margin.pricing.prices import ModelRates, PricingError, Rate, _rate, model_rates

ONE = Decimal(1)


def _discounted(r: Rate, discount: Decimal) -> Rate:
    keep = ONE - discount
    return Rate(r.base * keep, tuple((start, price * keep) for start, price in r.tiers))


def genai_batch_rates(ref: str, when: datetime | None = None) -> ModelRates | None:
    """The batch variant of ``model`` or ``provider/model`` in the bundled genai-prices table, or
    None if the table has none for it (at ``when``; None = now)."""
    import genai_prices

    provider, _, model = ref.rpartition("/")
    usage = genai_prices.Usage(input_tokens=1, output_tokens=1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            standard = genai_prices.calc_price(usage, model, provider_id=provider or None,
                                               genai_request_timestamp=when)
            batch = genai_prices.calc_price(usage, model, provider_id=provider or None,
                                            genai_request_timestamp=when, price_context={"processing": "batch"})
    except LookupError as e:
        raise PricingError(f"genai-prices has no price for {ref!r}: {e}") from None
    if batch.model_price == standard.model_price:
        return None  # no batch variant active for this model (the context changed nothing)
    mp = batch.model_price
    inp = _rate(getattr(mp, "input_mtok", None)) or Rate(Decimal(0))
    out = _rate(getattr(mp, "output_mtok", None)) or Rate(Decimal(0))
    cread = _rate(getattr(mp, "cache_read_mtok", None)) or inp
    cwrite = _rate(getattr(mp, "cache_write_mtok", None)) or inp
    source = f"genai-prices {genai_prices.__version__}: {batch.provider.id}/{batch.model.id} (batch)"
    return ModelRates(inp, out, cread, cwrite, source)


def batch_rates(m: ModelConfig, discount: Decimal | None = None, when: datetime | None = None) -> ModelRates:
    """The rates ``m`` is billed at in the provider's batch lane, exact Decimal per million tokens.

    Order: genai-prices' batch variant; else ``discount`` (a fraction, 0 <= d < 1) off the standard
    rates; else, for a self-hosted model, its standard rates. Anything else has no known batch
    price and raises ``PricingError`` naming the model, so no cost is invented."""
    if discount is not None and not Decimal(0) <= discount < ONE:
        raise PricingError(f"model {m.name!r}: a batch discount must be in [0, 1), not {discount}")
    p = m.price
    if p is not None and p.genai_prices is not None:
        found = genai_batch_rates(p.genai_prices, when)
        if found is not None:
            return found
    standard = model_rates(m)
    if discount is not None:
        return ModelRates(_discounted(standard.input, discount), _discounted(standard.output, discount),
                          _discounted(standard.cache_read, discount), _discounted(standard.cache_write, discount),
                          f"{standard.source} less {discount * 100:g}% batch discount")
    if p is not None and p.self_hosted is not None:
        return ModelRates(standard.input, standard.output, standard.cache_read, standard.cache_write,
                          f"{standard.source} (self-hosted: batch runs at the same rates)")
    if p is None:
        return standard  # unpriced is free in either lane
    raise PricingError(f"model {m.name!r}: no batch price known ({standard.source} has no batch variant); "
                       "configure a batch discount, e.g. 0.5 for 50%")
