"""Money first: every cost margin records must equal a hand computation and genai-prices."""

from __future__ import annotations

import warnings
from decimal import Decimal

import genai_prices
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from margin.config import ModelConfig, parse_config
from margin.domain import Usage
from margin.pricing import PriceBook, genai_rates, model_rates

D = Decimal


def test_openai_gpt4o_cached_input_is_billed_at_the_cache_rate() -> None:
    # $2.50 input, $1.25 cached input, $10 output per MTok.
    c = genai_rates("openai/gpt-4o").cost(Usage(input_tokens=1000, cached_input_tokens=400, output_tokens=500))
    assert c.input_usd == D("600") * D("2.5") / 1_000_000
    assert c.cache_read_usd == D("400") * D("1.25") / 1_000_000
    assert c.output_usd == D("500") * D("10") / 1_000_000
    assert c.total_usd == D("0.007")
    assert "openai/gpt-4o" in c.price_source


def test_anthropic_cache_read_and_write_are_separate_rates() -> None:
    # Claude Sonnet 4.5: $3 input, $0.30 cache read, $3.75 cache write, $15 output per MTok.
    u = Usage(input_tokens=10_000, cached_input_tokens=6_000, cache_write_tokens=2_000, output_tokens=1_000,
              reasoning_tokens=300)
    c = genai_rates("anthropic/claude-sonnet-4-5").cost(u)
    assert c.input_usd == D("0.006")
    assert c.cache_read_usd == D("0.0018")
    assert c.cache_write_usd == D("0.0075")
    assert c.output_usd == D("0.015")  # reasoning is part of output, not billed twice
    assert c.total_usd == D("0.0303")


def test_anthropic_long_context_cliff_moves_all_tokens_to_the_tier_rate() -> None:
    # Over 200k prompt tokens every token pays the long-context rate ($6 in, $22.50 out).
    c = genai_rates("anthropic/claude-sonnet-4-5").cost(Usage(input_tokens=250_000, output_tokens=1_000))
    assert c.input_usd == D("1.5")
    assert c.output_usd == D("0.0225")


def test_google_gemini_cached_tokens() -> None:
    # Gemini 2.5 Pro (<=200k): $1.25 input, $0.125 cached, $10 output per MTok.
    c = genai_rates("google/gemini-2.5-pro").cost(Usage(input_tokens=8_000, cached_input_tokens=6_000,
                                                        output_tokens=2_000))
    assert c.input_usd == D("2000") * D("1.25") / 1_000_000
    assert c.cache_read_usd == D("6000") * D("0.125") / 1_000_000
    assert c.output_usd == D("0.02")


def test_openai_reasoning_tokens_are_priced_as_output() -> None:
    # o3-mini: $1.10 input, $4.40 output per MTok; 800 of the 1000 output tokens are reasoning.
    c = genai_rates("openai/o3-mini").cost(Usage(input_tokens=100, output_tokens=1000, reasoning_tokens=800))
    assert c.total_usd == D("0.00011") + D("0.0044")


def test_explicit_prices_override_and_cache_defaults_to_input_rate() -> None:
    m = ModelConfig(name="x", provider="p", price={"per_million": {"input": "0.5", "output": "1.5"}})
    c = model_rates(m).cost(Usage(input_tokens=1_000_000, cached_input_tokens=500_000, output_tokens=2_000_000))
    assert c.total_usd == D("0.25") + D("0.25") + D("3.0")


def test_self_hosted_price_is_gpu_time() -> None:
    # $3.60/GPU-h x 2 GPUs = $0.002/s; 100 tok/s decode -> $20/MTok out; prefill 1000 tok/s -> $2/MTok in.
    m = ModelConfig(name="x", provider="p", price={"self_hosted": {"gpu_hour_usd": "3.60", "gpus": 2}},
                    throughput={"output_tokens_per_s": 100, "input_tokens_per_s": 1000}, power_watts=500)
    book = PriceBook([m])
    u = Usage(input_tokens=1000, output_tokens=100)
    assert book.cost("x", u).total_usd == D("0.002") + D("0.002")
    assert book.energy("x", u) == pytest.approx(500 * 2 * (1.0 + 1.0))


def test_unknown_genai_reference_is_a_clear_config_error() -> None:
    cfg = parse_config({"providers": [{"name": "p", "kind": "openai", "base_url": "http://x"}],
                        "models": [{"name": "m", "provider": "p", "price": {"genai_prices": "nope/no-such-model"}}]})
    with pytest.raises(Exception, match="no-such-model"):
        PriceBook(cfg.models)


MODELS = ["openai/gpt-4o", "openai/gpt-4o-mini", "openai/o3-mini", "anthropic/claude-sonnet-4-5",
          "anthropic/claude-3-5-haiku", "google/gemini-2.5-pro", "google/gemini-2.5-flash"]


@settings(max_examples=150, deadline=None)
@given(
    ref=st.sampled_from(MODELS),
    uncached=st.integers(0, 400_000),
    cached=st.integers(0, 100_000),
    write=st.integers(0, 50_000),
    out=st.integers(0, 50_000),
)
def test_split_cost_equals_genai_prices_total(ref: str, uncached: int, cached: int, write: int, out: int) -> None:
    provider, _, model = ref.partition("/")
    if provider != "anthropic":
        write = 0  # only Anthropic bills cache writes separately
    usage = Usage(input_tokens=uncached + cached + write, cached_input_tokens=cached,
                  cache_write_tokens=write, output_tokens=out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_total = genai_prices.calc_price(
            genai_prices.Usage(input_tokens=usage.input_tokens, cache_read_tokens=cached,
                               cache_write_tokens=write, output_tokens=out),
            model, provider_id=provider).total_price
    assert genai_rates(ref).cost(usage).total_usd == ref_total
