"""Synthetic ledger rows and spend histories, for tests, benchmarks and forecast backtests.

Deterministic for a seed. Rows have the exact shape `ledger.schema.event_to_row` produces, so they
go through the real stores like gateway traffic does."""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import numpy as np
import orjson

Row = dict[str, Any]  # a ledger row (margin.ledger.schema.Row); not imported, so benches need only numpy

TEAMS = ("search", "support", "legal", "research", "growth")
MODELS = (("gpt-4o-mini", "0.15", "0.60"), ("gpt-4o", "2.50", "10.00"), ("claude-haiku", "0.80", "4.00"))
WORKFLOWS = ("triage", "kyc", "contracts")
WEEKLY = (1.10, 1.15, 1.12, 1.08, 1.00, 0.55, 0.50)  # Monday .. Sunday
M = Decimal(1_000_000)


def daily_spend(days: int = 90, seed: int = 0, base: float = 100.0, trend: float = 0.8, noise: float = 0.08,
                weekly: tuple[float, ...] = WEEKLY, start_weekday: int = 0) -> np.ndarray:
    """USD per day: (base + trend * day) x weekday factor x lognormal noise."""
    rng = np.random.default_rng(seed)
    d = np.arange(days)
    week = np.array(weekly)[(d + start_weekday) % 7]
    out: np.ndarray = (base + trend * d) * week * np.exp(rng.normal(0.0, noise, days))
    return out


def uuid7_at(ts: datetime, rng: random.Random) -> str:
    """A UUIDv7 (RFC 9562) for `ts`: 48-bit Unix milliseconds, then 74 random bits from `rng`, as
    the gateway's `uuid_utils.uuid7()` makes them, so ids sort by time like a real ledger's do
    (the warehouse's de-duplication relies on that to stay cheap), yet deterministic for a seed."""
    ms = int(ts.timestamp() * 1000) & ((1 << 48) - 1)
    rand_a, rand_b = rng.getrandbits(12), rng.getrandbits(62)
    return str(uuid.UUID(int=(ms << 80) | (0x7 << 76) | (rand_a << 64) | (0b10 << 62) | rand_b))


def event_row(rng: random.Random, ts: datetime, team: str, model: int = 0, run_id: str = "", workflow: str = "",
              step: str = "", tool: str = "", status: int = 200, scale: float = 1.0) -> Row:
    name, pin, pout = MODELS[model]
    inp = int(rng.randint(200, 3000) * scale)
    out = int(rng.randint(20, 600) * scale)
    cached = inp // 2 if rng.random() < 0.3 else 0
    ci, co = Decimal(pin) * (inp - cached) / M + Decimal(pin) / 2 * cached / M, Decimal(pout) * out / M
    failed = status >= 400
    hit = not failed and rng.random() < 0.08
    actions: list[dict[str, object]] = []
    lever, avoided, saved_tokens = "", Decimal(0), 0
    if hit:
        lever, avoided, saved_tokens = "cache", ci + co, inp + out
        actions.append({"action": "cache_hit"})
        ci = co = Decimal(0)
    elif rng.random() < 0.05:
        lever, avoided, saved_tokens = "compression", ci / 4, inp // 4
        actions.append({"action": "saved", "lever": "compression", "usd": format(ci / 4, "f"), "tokens": inp // 4})
    requested, route = name, f"group auto: cheapest of {len(MODELS)} fitting"
    if not failed and not hit and model == 0 and rng.random() < 0.05:
        requested = "gpt-4o"
        actions.append({"action": "downgrade", "from": "gpt-4o", "to": name, "budget": f"{team}-monthly"})
    if failed:
        ci = co = Decimal(0)
        inp = out = cached = 0
    lat = rng.uniform(150, 2500) * scale
    return {
        "event_id": uuid7_at(ts, rng),
        "ts_start": ts.isoformat(), "ts_end": (ts + timedelta(milliseconds=lat)).isoformat(),
        "request_id": f"r{rng.getrandbits(32)}", "parent_event_id": None,
        "run_id": run_id or None, "step": step or None, "workflow": workflow or None, "agent": None,
        "tool": tool or None, "org": "acme", "team": team, "user": f"u{rng.randint(1, 40)}",
        "key_id": f"key_{team}", "app": "assistant", "env": "prod",
        "tags": orjson.dumps({"feature": rng.choice(("chat", "search", "summary"))}).decode(),
        "endpoint": "chat", "requested_model": requested, "model": name, "provider": "openai", "tier": "standard",
        "route_reason": route, "stream": 0, "input_tokens": inp, "cached_input_tokens": cached,
        "cache_write_tokens": 0, "output_tokens": out, "reasoning_tokens": 0, "usage_source": "provider",
        "cost_usd": format(ci + co, "f"), "cost_input_usd": format(ci, "f"), "cost_output_usd": format(co, "f"),
        "cost_cache_read_usd": "0", "cost_cache_write_usd": "0", "price_source": "synthetic",
        "lever": lever or None, "avoided_cost_usd": format(avoided, "f"), "tokens_saved": saved_tokens,
        "cache_hit": "exact" if hit else None, "latency_ms": lat, "ttft_ms": lat / 5, "tpot_ms": 12.0,
        "status": status, "error_type": "upstream_error" if failed else None, "energy_j": None,
        "actions": orjson.dumps(actions).decode(), "tool_calls": 1 if tool else 0,
    }


def events(n: int, start: datetime, days: int, seed: int = 1, run_share: float = 0.4) -> Iterator[Row]:
    """`n` events spread over `days` from `start` with weekly seasonality; part of them are agent
    runs (3-12 calls with tool steps) of the synthetic workflows."""
    rng = random.Random(seed)
    weights = [WEEKLY[(start + timedelta(days=d)).weekday()] * (1 + d / max(days, 1)) for d in range(days)]
    total = sum(weights)
    made = 0
    for d, w in enumerate(weights):
        count = n - made if d == days - 1 else int(n * w / total)
        day0 = start + timedelta(days=d)
        i = 0
        while i < count:
            ts = day0 + timedelta(seconds=rng.uniform(0, 86400))
            team = rng.choice(TEAMS)
            if rng.random() < run_share:
                steps = min(rng.randint(3, 12), count - i)
                run = f"run-{d}-{i}-{rng.getrandbits(24)}"
                wf = rng.choice(WORKFLOWS)
                for s in range(steps):
                    yield event_row(rng, ts + timedelta(seconds=4 * s), team, model=rng.choice((0, 0, 1)),
                                    run_id=run, workflow=wf, step=str(s + 1),
                                    tool="search" if s % 2 else "", status=429 if rng.random() < 0.02 else 200)
                i += steps
            else:
                yield event_row(rng, ts, team, model=rng.choice((0, 0, 0, 1, 2)),
                                status=502 if rng.random() < 0.01 else 200)
                i += 1
        made += count


def main(argv: list[str] | None = None) -> None:
    """`python -m margin.analytics.synthetic LEDGER_URL [--events N] [--start YYYY-MM-DD] [--days D]`:
    fill a ledger with synthetic events and an outcome for most runs (for demos and validation)."""
    import argparse
    import asyncio

    from margin.analytics.outcomes import parse_outcome
    from margin.ledger import open_store

    p = argparse.ArgumentParser(prog="python -m margin.analytics.synthetic")
    p.add_argument("ledger")
    p.add_argument("--events", type=int, default=5000)
    p.add_argument("--start", default="2026-11-01")
    p.add_argument("--days", type=int, default=30)
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args(argv)
    start = datetime.fromisoformat(a.start).replace(tzinfo=UTC)

    async def fill() -> None:
        st = open_store(a.ledger)
        await st.open()
        batch: list[Row] = []
        runs: dict[str, datetime] = {}
        for r in events(a.events, start, a.days, seed=a.seed):
            batch.append(r)
            if r["run_id"]:
                runs.setdefault(r["run_id"], datetime.fromisoformat(r["ts_start"]))
            if len(batch) >= 5000:
                await st.write_events(batch)
                batch = []
        if batch:
            await st.write_events(batch)
        rng = random.Random(a.seed)
        for run, t in runs.items():
            if rng.random() < 0.9:
                status = rng.choice(("success", "success", "success", "failure", "escalated"))
                await st.insert_outcome(parse_outcome(
                    {"run_id": run, "status": status, "value_usd": str(rng.randint(1, 20))},
                    now=t + timedelta(minutes=5)))
        await st.close()

    asyncio.run(fill())


if __name__ == "__main__":
    main()
