"""Budget and run-cap counters (and runs' wall-time clocks) summed from the ledger: for in-memory
state at start-up, and for a Redis that came back empty (gateway/reconcile.py). Counting errs
towards the strict side."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import orjson

from margin.domain import Attribution
from margin.domain.budget import Hold, to_units
from margin.gateway.budgets import BudgetGuard
from margin.policy import agents
from margin.policy import budget as policy


def _dims(r: dict[str, Any]) -> dict[str, str]:
    tags = tuple(sorted(orjson.loads(r.get("tags") or "{}").items()))
    attribution = Attribution(r.get("org") or "", r.get("team") or "", r.get("user") or "", r.get("app") or "",
                              r.get("env") or "", r.get("key_id") or "", tags)
    return policy.dims_of(attribution, r.get("workflow") or "", r.get("model") or "", r.get("provider") or "")


def _budget_spend(rows: list[dict[str, Any]], guard: BudgetGuard, now: datetime) -> list[tuple[Hold, int]]:
    totals: dict[str, tuple[Hold, int]] = {}
    for r in rows:
        if not r.get("cost_usd") or r.get("status") in (None, 0):
            continue
        ts = datetime.fromisoformat(r["ts_start"])
        for a in policy.applicable(guard.budgets, _dims(r), now):
            if not a.start <= ts < a.end:
                continue
            b = a.budget
            units = (to_units(Decimal(r["cost_usd"]), "usd") if b.unit == "usd"
                     else int(r.get("input_tokens") or 0) + int(r.get("output_tokens") or 0))
            hold = Hold(a.key, "budget", a.limit_units, 0, a.end.timestamp() + policy.COUNTER_SLACK_S,
                        float(b.rolling_s) if b.period == "rolling" else 0.0, b.unit)
            totals[a.key] = (hold, totals.get(a.key, (hold, 0))[1] + units)
    return list(totals.values())


def _run_call(r: dict[str, Any]) -> agents.RunCall | None:
    """A ledger event as a call of its run (`admitted` False if admission took nothing for it)."""
    if not r.get("run_id") or not r.get("model") or r.get("status") == 202:
        return None  # 202: queued by the batch lane; its run is another event
    return agents.RunCall(r["run_id"], _dims(r), datetime.fromisoformat(r["ts_start"]).timestamp(),
                          Decimal(r.get("cost_usd") or 0), int(r.get("tool_calls") or 0),
                          r.get("error_type") not in agents.REFUSED_AT_ADMISSION)


async def _run_calls(store: Any, guard: BudgetGuard, now: datetime) -> list[agents.RunCall]:
    """Every call of each run whose counters may still be alive (a run can outlast any window, and
    its counters live as long as it keeps calling)."""
    horizon = now - timedelta(seconds=max(c.ttl_s for c in guard.run_caps) + policy.COUNTER_SLACK_S)
    recent: dict[str, list[dict[str, Any]]] = {}
    for r in await store.fetch_events(since=horizon, runs_only=True):
        recent.setdefault(r["run_id"], []).append(r)
    calls: list[agents.RunCall] = []
    for run_id, rows in sorted(recent.items()):
        older = await store.fetch_events(until=horizon, run_id=run_id)  # only a run begun before the horizon has any
        calls.extend(c for r in [*older, *rows] if (c := _run_call(r)) is not None)
    return calls


async def recover_spend(store: Any, guard: BudgetGuard) -> int:
    """Sum this period's settled spend per budget counter, and the counters of agent runs still
    alive, from the ledger into the state. Returns the number of events read for the budgets."""
    now = datetime.now(UTC)
    items: list[tuple[Hold, int]] = []
    n = 0
    if guard.budgets:
        rows = await store.fetch_events(since=min(policy.window(b, now)[0] for b in guard.budgets))
        items, n = _budget_spend(rows, guard, now), len(rows)
    starts: list[tuple[str, float, float]] = []
    if guard.run_caps:
        calls = await _run_calls(store, guard, now)
        items += agents.recovered(guard.run_caps, calls, now.timestamp())
        starts = agents.recovered_starts(guard.run_caps, calls, now.timestamp())
    for hold, units in items:
        await guard.state.add_spent(hold, units, now.timestamp())
    for k, start, expires_at in starts:  # a clock already set since (a call raced the rebuild) is kept
        await guard.state.first_seen(k, start, expires_at)
    return n
