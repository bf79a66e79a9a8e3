"""Budgets, rate limits and agent run caps in a replay, call by call in arrival order at the
trace's time, as gateway/budgets.BudgetGuard.admit/_run_plan/settle do it: the run's caps are
planned by `policy.agents.plan` (wall time from the run's first call, tool calls counted after each
answer), then `policy.budget.plan(..., extra=run dollars, extra_holds=run call and repeat counters)`
decides, and its holds are reserved and settled all-or-nothing on a `MemoryState` (the in-process
reference semantics of the gateway's state)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from margin.domain import Call
from margin.domain.budget import CounterState, Hold
from margin.policy import agents
from margin.policy import budget as budget_policy
from margin.replay.outcome import BLOCKED, DEFERRED, RATE_LIMITED, RUN_STOPPED, BudgetLog, Outcome, RunLog

# The one import from state/ (DESIGN.md lets replay import domain, policy, pricing, planner): the
# counters' semantics (all-or-nothing holds, rolling sub-buckets, token buckets) must be the
# gateway's, and MemoryState is pure Python with no I/O, whose time is an argument.
from margin.state.memory import MemoryState

RESERVATION_TTL_S = 660.0  # a provider's default timeout + grace: every replayed call settles at once anyway


@dataclass(slots=True)
class Admitted:
    model: str  # after any downgrade
    max_tokens: int | None  # the output cap the budgets set (None: none)
    rid: str = ""
    holds: list[Hold] = field(default_factory=list)
    tools: list[Hold] = field(default_factory=list)  # run caps counting the tool calls of the answer
    downgraded: bool = False
    applied: list[str] = field(default_factory=list)  # the budgets (and run dollar caps) that applied


@dataclass(slots=True)
class Refused:
    status: int  # BLOCKED | RATE_LIMITED | DEFERRED | RUN_STOPPED
    model: str  # what a deferred call will be served by
    stop: tuple[str, str] | None = None  # (run cap id, limit) for RUN_STOPPED


class Admitter:
    def __init__(self, o: Outcome):
        self.o = o
        self.pol = o.policy
        self.state = MemoryState()
        self.snapshot: dict[str, CounterState] = {}
        self.logs = o.budgets = {b.id: BudgetLog() for b in self.pol.budgets}
        self._worst: dict[tuple[str, int, int], Decimal] = {}

    def _price(self, model: str, inp: int, out: int) -> Decimal:
        # BudgetGuard._price, memoised: plan() binary-searches the output cap with it.
        k = (model, inp, out)
        v = self._worst.get(k)
        if v is None:
            v = self._worst[k] = self.pol.prices.rates(model).worst_case(inp, out)
            if len(self._worst) > 2_000_000:
                self._worst.clear()
        return v

    def _log(self, budget_id: str, action: str, when: datetime) -> None:
        log = self.logs.get(budget_id)  # run caps' dollar limits are budget-like but not budgets
        if log is not None:
            log.hit(action, when)

    async def admit(self, call: Call, run_id: str, model: str, bound: int, max_tokens: int | None, message: str,
                    when: datetime) -> Admitted | Refused:
        pol, now = self.pol, when.timestamp()
        dims = budget_policy.dims_of(call.attribution, call.workflow, model, pol.provider_of(model))
        run = await self._run_plan(dims, run_id, message, when) if pol.run_caps and run_id else None
        if run is not None and run.stop is not None:
            return self._stopped(run.stop, run_id, model, when)
        args: dict[str, Any] = dict(
            dims=dims, budgets=pol.budgets, rate_limits=pol.rate_limits, price=self._price, prompt_bound=bound,
            max_tokens=max_tokens, model_max_output=pol.models[model].output_cap, priority=call.priority,
            now=when, provider_of=pol.provider_of, extra=run.dollars if run else (),
            extra_holds=run.holds if run else ())
        p = budget_policy.plan(model=model, snapshot=self.snapshot, **args)
        for a, th, _ in p.notify:
            if await self.state.mark_fired(a.key, f"notify@{th.pct}", a.end.timestamp() + 86400):
                self._log(a.budget.id, "notifies", when)
        if p.refusal is not None:
            return self._refused(p.refusal, p, run_id, when)
        tools = run.tool_counters if run else []
        if not p.holds:
            return Admitted(p.model, p.max_tokens, tools=tools, applied=[a.budget.id for a in p.applied])
        rid = uuid.uuid4().hex
        res = await self.state.reserve(rid, p.holds, now, RESERVATION_TTL_S)
        self.snapshot.update(res.states)
        if not res.ok:  # as BudgetGuard.admit: plan again on what the reservation saw
            p = budget_policy.plan(model=model, snapshot={**self.snapshot, **res.states}, **args)
            if p.refusal is None:
                res = await self.state.reserve(rid, p.holds, now, RESERVATION_TTL_S)
                self.snapshot.update(res.states)
            if p.refusal is not None:
                return self._refused(p.refusal, p, run_id, when)
            if not res.ok:
                return self._failed(res.failed_key, run_id, model, when)
        if p.downgraded_from:
            for bid in _downgraders(p, self.snapshot):
                self._log(bid, "downgrades", when)
        return Admitted(p.model, p.max_tokens, rid, p.holds, tools, bool(p.downgraded_from),
                        [a.budget.id for a in p.applied])

    async def _run_plan(self, dims: dict[str, str], run_id: str, message: str, when: datetime) -> agents.RunPlan | None:
        caps = agents.applicable(self.pol.run_caps, dims, run_id)
        if not caps:
            return None
        t = when.timestamp()
        started = {c.id: await self.state.first_seen(agents.key(c, "start", run_id), t, t + c.ttl_s)
                   for c in caps if c.max_wall_s is not None}  # the run's clock starts at its first call
        tools = [agents.tool_counter(c, run_id, t + c.ttl_s) for c in caps if c.max_tool_calls is not None]
        snapshot = await self.state.snapshot(tools, t) if tools else {}
        return agents.plan(caps, run_id, message, snapshot, started, when)

    def _stopped(self, stop: agents.RunStop, run_id: str, model: str, when: datetime) -> Refused:
        key = (stop.cap.id, stop.limit)
        self.o.runs.setdefault(key, RunLog()).hit(run_id, when)
        return Refused(RUN_STOPPED, model, key)

    def _refused(self, r: budget_policy.Refusal, p: budget_policy.BudgetPlan, run_id: str,
                 when: datetime) -> Refused:
        if r.budget_id.startswith("run:"):  # a run's dollar cap (as BudgetGuard._refuse)
            caps = self.pol.run_caps
            counter = r.budget_id if r.budget_id.count(":") >= 3 else agents.key(
                next(c for c in caps if f"run:{c.id}" == r.budget_id), "usd", run_id)
            stop = agents.stop_for(counter, caps, self.snapshot.get(counter, CounterState()))
            if stop is not None:
                return self._stopped(stop, run_id, p.model, when)
        if r.code == "budget_deferred":  # waits for the next period, in the batch lane
            self._log(r.budget_id, "defers", when)
            return Refused(DEFERRED, p.model)
        if r.budget_id:
            self._log(r.budget_id, "blocks", when)
            return Refused(BLOCKED, p.model)
        return Refused(RATE_LIMITED, p.model)

    def _failed(self, key: str, run_id: str, model: str, when: datetime) -> Refused:
        """The reservation still failed after planning again (BudgetGuard._refusal_for)."""
        if key.startswith("run:"):
            stop = agents.stop_for(key, self.pol.run_caps, self.snapshot.get(key, CounterState()))
            if stop is not None:
                return self._stopped(stop, run_id, model, when)
        if key.startswith("rl:"):
            return Refused(RATE_LIMITED, model)
        self._log(key.split(":")[1], "blocks", when)
        return Refused(BLOCKED, model)

    async def settle(self, a: Admitted, cost_units: int, tokens: int, tool_calls: int, now: float) -> None:
        """As BudgetGuard.settle: USD at the metered cost, tokens as used, call counts as reserved;
        the answer's tool calls are added to the run's tool counters."""
        if a.tools and tool_calls:
            for h in a.tools:
                await self.state.add_spent(h, tool_calls, now)
        if not a.holds:
            return
        actual = {h.key: (h.amount if h.unit == "calls" else cost_units if h.unit == "usd" else tokens)
                  if h.kind == "budget" else (1 if h.key.endswith(":rpm") else tokens) for h in a.holds}
        self.snapshot.update(await self.state.settle(a.rid, actual, now))

    def finish(self) -> None:
        for key, st in self.snapshot.items():
            if key.startswith("b:"):
                self.o.counters[key] = (st, key.split(":")[1])

    def truncated(self, a: Admitted, when: datetime) -> None:
        for bid in a.applied:
            self._log(bid, "truncations", when)


def _downgraders(p: budget_policy.BudgetPlan, snapshot: dict[str, CounterState]) -> list[str]:
    """The budgets whose downgrade threshold fired (not every budget that applies)."""
    out = []
    for a in p.applied:
        frac = snapshot.get(a.key, CounterState()).used_fraction(a.limit_units) * 100
        if any(t.action == "downgrade" and frac >= float(t.pct) for t in a.budget.thresholds):
            out.append(a.budget.id)
    return out or [a.budget.id for a in p.applied[:1]]
