"""Budgets and rate limits in a replay: the gateway's `policy.budget.plan` for every request in
arrival order, at the trace's time, its holds reserved and settled on a `MemoryState` (the
in-process reference semantics of the gateway's state)."""

from __future__ import annotations

import uuid
from datetime import timedelta
from decimal import Decimal
from typing import Any

import numpy as np
import orjson

from margin.domain import Usage
from margin.domain.budget import CounterState, to_units
from margin.policy import budget as budget_policy
from margin.replay.costing import BATCH
from margin.replay.levers import ExactCache, PrefixCacheSim
from margin.replay.outcome import BLOCKED, DEFERRED, RATE_LIMITED, SERVED, BudgetLog, Outcome, Progress, exact_one
from margin.replay.traces import Trace

# The one import from state/ (DESIGN.md lets replay import domain, policy, pricing, planner): the
# counters' semantics (all-or-nothing holds, rolling sub-buckets, token buckets) must be the
# gateway's, and MemoryState is pure Python with no I/O, whose time is an argument.
from margin.state.memory import MemoryState


async def run_budgets(o: Outcome, keys: list[tuple[dict[str, Any], str]] | None, progress: Progress | None) -> None:
    """Budgets and rate limits, request by request in arrival order, on a `MemoryState` (the
    reference semantics of the gateway's state); each call settles at its metered cost at once."""
    pol, tr = o.policy, o.trace
    state = MemoryState()
    snapshot: dict[str, CounterState] = {}
    c = pol.cfg.cache
    cache = ExactCache(c.max_entries, c.ttl_s)
    prefix = PrefixCacheSim(pol.settings.prefix_cache) if tr.hash_ids is not None else None
    index = {m: i for i, m in enumerate(o.models)}
    logs = o.budgets = {b.id: BudgetLog() for b in pol.budgets}
    cost_memo: dict[tuple[int, int, int, int, int], Any] = {}

    worst: dict[tuple[str, int, int], Decimal] = {}

    def price(model: str, inp: int, out: int) -> Decimal:
        # BudgetGuard._price, memoised: plan() binary-searches the output cap with it.
        k = (model, inp, out)
        v = worst.get(k)
        if v is None:
            v = worst[k] = pol.prices.rates(model).worst_case(inp, out)
            if len(worst) > 2_000_000:
                worst.clear()
        return v

    rows = np.flatnonzero(o.status == SERVED).tolist()
    for done, i in enumerate(rows, 1):
        if progress and done % 20_000 == 0:
            progress("budgets", done, len(rows))
        call = o.calls[int(o.combo[i])]
        model = o.models[int(o.served[i])]
        when = o.start + timedelta(seconds=float(tr.arrival_s[i]))
        now = when.timestamp()
        args: dict[str, Any] = dict(
            dims=budget_policy.dims_of(call.attribution, call.workflow, model, pol.provider_of(model)),
            budgets=pol.budgets, rate_limits=pol.rate_limits, price=price, prompt_bound=_bound(tr, i),
            max_tokens=int(tr.max_tokens[i]) if tr.max_tokens is not None and tr.max_tokens[i] else
            pol.settings.max_tokens, model_max_output=pol.models[model].output_cap, priority=call.priority,
            now=when, provider_of=pol.provider_of)
        p = budget_policy.plan(model=model, snapshot=snapshot, **args)
        for a, th, _ in p.notify:
            if await state.mark_fired(a.key, f"notify@{th.pct}", a.end.timestamp() + 86400):
                logs[a.budget.id].hit("notifies", when)
        rid = uuid.uuid4().hex
        ok = p.refusal is None
        if ok and p.holds:
            res = await state.reserve(rid, p.holds, now, 660.0)
            snapshot.update(res.states)
            if not res.ok:  # as BudgetGuard.admit: plan again on what the reservation saw
                p = budget_policy.plan(model=model, snapshot={**snapshot, **res.states}, **args)
                if p.refusal is None:
                    res = await state.reserve(rid, p.holds, now, 660.0)
                    snapshot.update(res.states)
                ok = p.refusal is None and res.ok
                if p.refusal is None and not res.ok:
                    o.status[i] = RATE_LIMITED if res.failed_key.startswith("rl:") else BLOCKED
                    if o.status[i] == BLOCKED:
                        bid = res.failed_key.split(":")[1]
                        logs[bid].hit("blocks", when)
                    continue
        if not ok:
            assert p.refusal is not None
            if p.refusal.code == "budget_deferred":  # waits for the next period, in the batch lane
                o.status[i], o.lane[i], o.served[i] = DEFERRED, BATCH, index[p.model]
                logs[p.refusal.budget_id].hit("defers", when)
            else:
                o.status[i] = BLOCKED if p.refusal.budget_id else RATE_LIMITED
                if p.refusal.budget_id:
                    logs[p.refusal.budget_id].hit("blocks", when)
            continue
        if p.downgraded_from:
            o.served[i], o.downgraded[i] = index[p.model], True
            for bid in _downgraders(p, snapshot):
                logs[bid].hit("downgrades", when)
        if p.max_tokens is not None and o.output[i] > p.max_tokens:
            o.output[i], o.truncated[i] = p.max_tokens, True
            for a in p.applied:
                logs[a.budget.id].hit("truncations", when)
        m = int(o.served[i])
        hit = exact_one(o, keys, cache, i, float(tr.arrival_s[i]))
        if not hit and prefix is not None:
            o.cached[i] = prefix.use(m, tr.hash_ids[i], int(tr.input_tokens[i]), float(tr.arrival_s[i]))  # type: ignore[index]
        if not p.holds:
            continue
        k = (m, int(o.lane[i]), int(tr.input_tokens[i]), int(o.cached[i]), int(o.output[i]))
        if hit:
            cost, tokens = 0, 0  # a hit settles at zero (pipeline: cache before send)
        else:
            if k not in cost_memo:
                rates = pol.batch_rates(o.models[m]) if k[1] == BATCH else pol.prices.rates(o.models[m])
                cost_memo[k] = to_units(rates.cost(Usage(k[2], k[4], k[3])).total_usd, "usd")
            cost, tokens = cost_memo[k], k[2] + k[4]
        # As BudgetGuard.settle: USD at the metered cost, tokens as used, call counts as reserved.
        actual = {h.key: (h.amount if h.unit == "calls" else cost if h.unit == "usd" else tokens)
                  if h.kind == "budget" else (1 if h.key.endswith(":rpm") else tokens) for h in p.holds}
        snapshot.update(await state.settle(rid, actual, now))
    for a_key, st in snapshot.items():
        if a_key.startswith("b:"):
            o.counters[a_key] = (st, a_key.split(":")[1])


def _downgraders(p: budget_policy.BudgetPlan, snapshot: dict[str, CounterState]) -> list[str]:
    """The budgets whose downgrade threshold fired (not every budget that applies)."""
    out = []
    for a in p.applied:
        frac = snapshot.get(a.key, CounterState()).used_fraction(a.limit_units) * 100
        if any(t.action == "downgrade" and frac >= float(t.pct) for t in a.budget.thresholds):
            out.append(a.budget.id)
    return out or [a.budget.id for a in p.applied[:1]]


def _bound(tr: Trace, i: int) -> int:
    """The prompt bound the gateway reserves on: from the body's UTF-8 size where messages were
    recorded, else the recorded input tokens (exact, so tighter than the gateway could be)."""
    if tr.messages is not None and tr.messages[i] is not None:
        msgs = tr.messages[i] or []
        return budget_policy.input_bound(len(orjson.dumps({"messages": msgs})), len(msgs))
    return int(tr.input_tokens[i])
