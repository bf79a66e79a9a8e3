"""Budget arithmetic and policy: property tests (hypothesis) for what money depends on."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from margin.domain import Attribution
from margin.domain.budget import Budget, CounterState, Hold, RateLimit, Threshold, from_units, to_units
from margin.policy.budget import (
    affordable_output,
    applicable,
    dims_of,
    downgrade_target,
    input_bound,
    plan,
    window,
)
from margin.pricing import genai_rates
from margin.state import MemoryState

NOW = datetime(2026, 11, 22, 15, 30, tzinfo=UTC)
RATES = {"gpt-4o": genai_rates("openai/gpt-4o"), "gpt-4o-mini": genai_rates("openai/gpt-4o-mini"),
         "claude": genai_rates("anthropic/claude-sonnet-4-5")}


def price(model: str, inp: int, out: int) -> Decimal:
    return RATES[model].worst_case(inp, out)


def hold(key: str, limit: int, amount: int, window_s: float = 0.0) -> Hold:
    return Hold(key, "budget", limit, amount, NOW.timestamp() + 10**6, window_s)


# --- reserve / settle arithmetic ------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(limit=st.integers(1, 10**7),
       ops=st.lists(st.tuples(st.integers(0, 3 * 10**6), st.floats(0, 1), st.sampled_from(["settle", "lapse"])),
                    max_size=60))
def test_settled_spend_never_exceeds_the_limit(limit: int, ops: list[tuple[int, float, str]]) -> None:
    async def run() -> None:
        s = MemoryState()
        now = NOW.timestamp()
        for i, (amount, frac, end) in enumerate(ops):
            r = await s.reserve(f"r{i}", [hold("k", limit, amount)], now, ttl_s=30)
            st_ = (await s.snapshot([hold("k", limit, 0)], now))["k"]
            assert st_.spent + st_.reserved <= limit
            if not r.ok:
                assert r.states["k"].spent + r.states["k"].reserved + amount > limit
                continue
            if end == "settle":  # the real cost is at most the worst case reserved
                await s.settle(f"r{i}", {"k": int(amount * frac)}, now)
            else:  # the replica died: the reservation lapses
                now += 31
        final = (await s.snapshot([hold("k", limit, 0)], now + 31))["k"]
        assert final.spent <= limit and final.reserved == 0

    asyncio.run(run())


@settings(max_examples=100, deadline=None)
@given(limits=st.lists(st.integers(1, 1000), min_size=2, max_size=4),
       amounts=st.lists(st.integers(0, 400), max_size=40))
def test_reservation_is_all_or_nothing_across_scopes(limits: list[int], amounts: list[int]) -> None:
    async def run() -> None:
        s = MemoryState()
        now = NOW.timestamp()
        keys = [f"k{i}" for i in range(len(limits))]
        for i, a in enumerate(amounts):
            holds = [hold(k, lim, a) for k, lim in zip(keys, limits, strict=True)]
            r = await s.reserve(f"r{i}", holds, now, 30)
            snap = await s.snapshot(holds, now)
            reserved = {snap[k].reserved for k in keys}
            assert len(reserved) == 1  # every scope moved together, or none did
            if r.ok:
                await s.settle(f"r{i}", {k: a for k in keys}, now)
        snap = await s.snapshot([hold(k, lim, 0) for k, lim in zip(keys, limits, strict=True)], now)
        assert all(snap[k].spent <= lim for k, lim in zip(keys, limits, strict=True))

    asyncio.run(run())


def test_concurrent_reservations_on_one_loop_hold_the_limit() -> None:
    async def run() -> None:
        s = MemoryState()
        now = NOW.timestamp()
        rng = random.Random(3)

        async def one(i: int) -> int:
            amount = rng.randint(1, 50_000)
            r = await s.reserve(f"r{i}", [hold("k", 1_000_000, amount)], now, 30)
            await asyncio.sleep(rng.random() / 100)
            if r.ok:
                await s.settle(f"r{i}", {"k": rng.randint(0, amount)}, now)
            return int(r.ok)

        ok = sum(await asyncio.gather(*(one(i) for i in range(500))))
        snap = (await s.snapshot([hold("k", 1_000_000, 0)], now))["k"]
        assert snap.spent <= 1_000_000 and snap.reserved == 0 and 0 < ok < 500

    asyncio.run(run())


def test_rolling_window_forgets_old_spend() -> None:
    async def run() -> None:
        s = MemoryState()
        t = NOW.timestamp()
        h = hold("k", 100, 60, window_s=3600)
        assert (await s.reserve("a", [h], t, 30)).ok
        await s.settle("a", {"k": 60}, t)
        assert not (await s.reserve("b", [h], t + 1800, 30)).ok  # 60 + 60 > 100 within the hour
        assert (await s.reserve("c", [h], t + 3700, 30)).ok  # the first 60 has rolled out

    asyncio.run(run())


def test_token_bucket_refills_and_says_when() -> None:
    async def run() -> None:
        s = MemoryState()
        t = NOW.timestamp()
        rpm = Hold("rl", "bucket", 60, 1, t + 120, 60.0, "tokens")
        for i in range(60):
            assert (await s.reserve(f"r{i}", [rpm], t, 30)).ok
        r = await s.reserve("x", [rpm], t, 30)
        assert not r.ok and r.retry_after_s == pytest.approx(1.0)
        assert (await s.reserve("y", [rpm], t + 1.0, 30)).ok

    asyncio.run(run())


def test_units_round_up_never_down() -> None:
    assert to_units(Decimal("0.0000000001"), "usd") == 1  # a tenth of a nano-dollar still counts
    assert to_units(Decimal("1.00"), "usd") == 10**9
    assert from_units(10**9, "usd") == Decimal(1)
    assert to_units(Decimal(1234), "tokens") == 1234


# --- periods, scopes, downgrades ---------------------------------------------------------------

def test_calendar_windows_in_the_budget_time_zone() -> None:
    b = Budget("m", Decimal(1), period="month", timezone="America/New_York")
    start, end = window(b, datetime(2026, 12, 1, 3, 0, tzinfo=UTC))  # still Nov 30 in New York
    assert (start.month, start.day, start.hour, end.month, end.day) == (11, 1, 0, 12, 1)
    assert start.utcoffset() != end.utcoffset()  # DST ended during November
    d = Budget("d", Decimal(1), period="day", timezone="Asia/Tokyo")
    s, e = window(d, NOW)
    assert (s.day, s.hour, (e - s).days) == (23, 0, 1)
    w = Budget("w", Decimal(1), period="week")
    s, _ = window(w, NOW)  # 2026-11-22 is a Sunday: the week began Monday the 16th
    assert (s.day, s.weekday()) == (16, 0)


def test_scopes_exact_wildcard_and_combinations() -> None:
    a = Attribution(org="acme", team="search", user="ana", key_id="key_1", tags=(("workflow", "kyc"),))
    dims = dims_of(a, "kyc", "gpt-4o", "openai")
    budgets = [
        Budget("org", Decimal(100), scope=(("org", "acme"),)),
        Budget("per-user", Decimal(5), scope=(("user", "*"),)),
        Budget("team-model", Decimal(10), scope=(("team", "search"), ("model", "gpt-4o"))),
        Budget("other-team", Decimal(10), scope=(("team", "ads"),)),
        Budget("tag", Decimal(10), scope=(("tag:workflow", "kyc"),)),
    ]
    got = {x.budget.id: x.key for x in applicable(budgets, dims, NOW)}
    assert set(got) == {"org", "per-user", "team-model", "tag"}
    assert "user=ana" in got["per-user"] and "team=search,model=gpt-4o" in got["team-model"]
    no_user = dims_of(Attribution(org="acme"), "", "gpt-4o", "openai")
    assert "per-user" not in {x.budget.id for x in applicable(budgets, no_user, NOW)}


@pytest.mark.parametrize(("mapping", "model", "expect"), [
    ((("gpt-4o", "gpt-4o-mini"),), "gpt-4o", "gpt-4o-mini"),
    ((("*-large", "*-small"),), "acme-large", "acme-small"),
    ((("claude-*-opus", "claude-*-haiku"),), "claude-4-opus", "claude-4-haiku"),
    ((("gpt-4o", "gpt-4o-mini"),), "o3", None),
])
def test_downgrade_maps_with_globs(mapping: tuple[tuple[str, str], ...], model: str, expect: str | None) -> None:
    assert downgrade_target(mapping, model) == expect


@settings(max_examples=100, deadline=None)
@given(remaining=st.integers(0, 10**8), prompt=st.integers(1, 300_000), model=st.sampled_from(list(RATES)))
def test_affordable_output_is_the_largest_cap_that_fits(remaining: int, prompt: int, model: str) -> None:
    b = Budget("b", from_units(remaining, "usd"))
    [a] = applicable([b], {}, NOW)
    cap = affordable_output([a], {}, price, model, prompt, 16_384)
    if cap > 0:
        assert to_units(price(model, prompt, cap), "usd") <= remaining
    if cap < 16_384:
        assert to_units(price(model, prompt, cap + 1), "usd") > remaining


def test_input_bound_covers_bytes() -> None:
    text = "héllo wörld " * 100
    assert input_bound(len(text.encode()), 1) >= len(text.encode())


# --- the plan ------------------------------------------------------------------------------------

def dept_budget(*thresholds: Threshold) -> Budget:
    return Budget("dept", Decimal("100"), scope=(("team", "research"),), thresholds=thresholds)


def at(pct: int | str) -> dict[str, CounterState]:
    [a] = applicable([dept_budget()], {"team": "research"}, NOW)
    return {a.key: CounterState(spent=to_units(Decimal(pct), "usd"))}


def run_plan(budget: Budget, snapshot: dict[str, CounterState], model: str = "gpt-4o", max_tokens: int | None = 100,
             priority: str = "", limits: tuple[RateLimit, ...] = ()) -> object:
    return plan(dims={"team": "research"}, model=model, budgets=[budget], rate_limits=limits, snapshot=snapshot,
                price=price, prompt_bound=1000, max_tokens=max_tokens, model_max_output=4096, priority=priority,
                now=NOW)


def test_heavy_models_downgraded_at_80_percent_blocked_at_100() -> None:
    b = dept_budget(Threshold(Decimal(50), "notify"),
                    Threshold(Decimal(80), "downgrade", downgrade=(("gpt-4o", "gpt-4o-mini"),)),
                    Threshold(Decimal(90), "defer"), Threshold(Decimal(100), "block"))
    p = run_plan(b, at(10))
    assert p.model == "gpt-4o" and not p.notify and p.refusal is None  # type: ignore[attr-defined]
    p = run_plan(b, at(60))
    assert len(p.notify) == 1 and p.model == "gpt-4o"  # type: ignore[attr-defined]
    p = run_plan(b, at(85))
    assert (p.model, p.downgraded_from) == ("gpt-4o-mini", "gpt-4o")  # type: ignore[attr-defined]
    assert p.holds[0].amount == to_units(price("gpt-4o-mini", 1000, 100), "usd")  # type: ignore[attr-defined]
    p = run_plan(b, at(92), priority="low")
    assert p.refusal.code == "budget_deferred"  # type: ignore[attr-defined]
    p = run_plan(b, at(92))
    assert p.refusal is None and p.model == "gpt-4o-mini"  # type: ignore[attr-defined]
    p = run_plan(b, at(100))
    r = p.refusal  # type: ignore[attr-defined]
    assert r.code == "budget_exceeded" and "dept" in r.message and "resets 2026-12-01" in r.message


def test_cap_is_set_from_the_remaining_budget_when_the_client_gives_none() -> None:
    # $0.01 left; 1000 prompt tokens cost $0.0025 at most, so $0.0075 buys 750 output tokens at $10/MTok.
    p = run_plan(dept_budget(), at("99.99"), max_tokens=None)
    assert p.max_tokens == 750  # type: ignore[attr-defined]
    assert p.holds[0].amount <= to_units(Decimal("0.01"), "usd")  # type: ignore[attr-defined]
    p = run_plan(dept_budget(), at(100), max_tokens=None)
    assert p.refusal.code == "budget_exceeded"  # type: ignore[attr-defined]


def test_an_endpoint_minimum_output_refuses_a_smaller_cap() -> None:
    # $0.0026 left: the 1000-token prompt bound takes $0.0025, leaving 10 output tokens at $10/MTok.
    assert run_plan(dept_budget(), at("99.9974"), max_tokens=None).max_tokens == 10  # type: ignore[attr-defined]
    p = plan(dims={"team": "research"}, model="gpt-4o", budgets=[dept_budget()], rate_limits=(),
             snapshot=at("99.9974"), price=price, prompt_bound=1000, max_tokens=None, model_max_output=4096,
             priority="", now=NOW, min_output=16)  # the Responses API refuses max_output_tokens < 16
    assert p.refusal is not None and p.refusal.code == "budget_exceeded"


def test_rate_limits_become_bucket_holds() -> None:
    p = run_plan(dept_budget(), {}, limits=(RateLimit("team-rl", (("team", "*"),), rpm=60, tpm=10_000),))
    kinds = [(h.kind, h.key.rsplit(":", 1)[-1], h.amount) for h in p.holds]  # type: ignore[attr-defined]
    assert ("bucket", "rpm", 1) in kinds and ("bucket", "tpm", 1100) in kinds
