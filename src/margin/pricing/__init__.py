"""Prices (genai-prices, config overrides, self-hosted GPU time) and local token counts."""

from margin.pricing.prices import ModelRates, PriceBook, PricingError, Rate, energy_joules, genai_rates, model_rates

__all__ = ["ModelRates", "PriceBook", "PricingError", "Rate", "energy_joules", "genai_rates", "model_rates"]
