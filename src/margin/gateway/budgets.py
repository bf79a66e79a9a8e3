"""The imperative side of budgets: load definitions, call the pure policy, reserve and settle on
the state backend, fire notifications, degrade as configured when shared state is down."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import aiohttp
import orjson

from margin.config import BudgetConfig, Config
from margin.domain import Call, Event, RouteDecision, responses
from margin.domain.budget import Budget, CounterState, Hold, Threshold, to_units
from margin.gateway.errors import GatewayError
from margin.policy import agents
from margin.policy import budget as policy
from margin.pricing import PriceBook
from margin.state import MemoryState, State, StateUnavailable
from margin.telemetry import Telemetry
from margin.wiring import to_budget, to_rate_limit, to_run_cap

log = logging.getLogger("margin.budgets")
SETTLE_BATCH_S = 0.002


class BudgetRefused(GatewayError):
    status, type, code = 429, "budget_error", "budget_exceeded"


class RunLimitExceeded(GatewayError):
    status, type, code = 429, "run_limit_error", "run_limit_exceeded"


class StateDown(GatewayError):
    status, type, code = 503, "api_error", "budget_state_unavailable"


@dataclass(slots=True)
class Admission:
    """What a call took from its budgets; settled exactly once when it ends."""

    rid: str
    plan: policy.BudgetPlan
    state: State
    tool_counters: list[Hold] | None = None  # run caps counting the tool calls this call's answer issues


class BudgetGuard:
    def __init__(self, cfg: Config, prices: PriceBook, state: State, telemetry: Telemetry | None = None):
        self.telemetry = telemetry or Telemetry()
        self.telemetry.bind_budgets(self.usage_ratios)
        self.cfg = cfg
        self.prices = prices
        self.state = state
        self.fallback = MemoryState()  # fail-open allowance while shared state is down
        self.config_budgets = {b.id: b for b in cfg.budgets}
        self.budgets: list[Budget] = [to_budget(b) for b in cfg.budgets]
        self.definitions: dict[str, BudgetConfig] = dict(self.config_budgets)
        self.stored_ids: set[str] = set()
        self.rate_limits = [to_rate_limit(r) for r in cfg.rate_limits]
        self.run_caps = [to_run_cap(c) for c in cfg.run_caps]
        self.snapshot: dict[str, CounterState] = {}
        self.fired: list[dict[str, Any]] = []  # recent actions, for /admin/budgets status
        self.models = {m.name: m for m in cfg.models}
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._settles: list[tuple[str, dict[str, int], float]] = []
        self._flusher: asyncio.Task[None] | None = None

    @property
    def active(self) -> bool:
        return bool(self.budgets or self.rate_limits or self.run_caps)

    def load(self, stored: list[BudgetConfig], deleted: set[str] | None = None) -> None:
        """Config budgets, overlaid by those stored through the admin API (stored wins by id;
        a deleted config budget stays deleted)."""
        defs = {k: v for k, v in self.config_budgets.items() if k not in (deleted or set())}
        defs.update({b.id: b for b in stored})
        self.stored_ids = {b.id for b in stored}
        self.definitions = defs
        self.budgets = [to_budget(b) for b in defs.values()]

    def usage_ratios(self) -> dict[str, float]:
        """Per budget id, the busiest counter's (spent + reserved) / limit from this replica's last
        view of the state (label values: configured budget ids only)."""
        limits = {b.id: to_units(b.limit, b.unit) for b in self.budgets}
        out: dict[str, float] = {}
        for key, st in list(self.snapshot.items()):
            if not key.startswith("b:"):
                continue
            bid = key.split(":", 2)[1]
            if bid in limits:
                out[bid] = max(out.get(bid, 0.0), st.used_fraction(limits[bid]))
        return out

    def _price(self, model: str, inp: int, out: int) -> Decimal:
        return self.prices.rates(model).worst_case(inp, out)

    def _provider(self, model: str) -> str:
        m = self.models.get(model)
        return m.provider if m else ""

    # -- admission ------------------------------------------------------------------------------
    async def admit(self, call: Call, decision: RouteDecision, body_len: int, n_messages: int,
                    ev: Event, message: str = "", ttl_s: float | None = None) -> Admission | None:
        """`message`: the hash of the call's newest message (loop detection), when run caps apply.
        `ttl_s`: how long the reservation must outlive a call that is not answered at once (an item
        in a provider's batch); by default the provider's timeout + `reservation_grace_s`."""
        if not self.active:
            return None
        now = datetime.now(UTC)
        model_cfg = self.models[decision.model]
        dims = policy.dims_of(call.attribution, call.workflow, decision.model, decision.provider)
        run = await self._run_plan(call, dims, message, now, ev) if self.run_caps and call.run_id else None
        args: dict[str, Any] = dict(
            dims=dims, budgets=self.budgets, rate_limits=self.rate_limits, price=self._price,
            prompt_bound=policy.input_bound(body_len, n_messages), max_tokens=call.max_tokens,
            model_max_output=model_cfg.output_cap, priority=call.priority, now=now, provider_of=self._provider,
            extra=run.dollars if run else (), extra_holds=run.holds if run else (),
            min_output=responses.MIN_OUTPUT_TOKENS if call.endpoint == "response" else 1,
        )
        p = policy.plan(model=decision.model, snapshot=self.snapshot, **args)
        self._notify(p, ev)
        if p.refusal is not None:
            await self._refuse(p.refusal, ev, call)
        if not p.holds:  # no budget or limit covers this call: no round trip to the state
            return Admission("", p, self.state, run.tool_counters) if run and run.tool_counters else None
        rid = uuid.uuid4().hex
        # A reservation outlives the longest the call can take, then lapses (a crashed replica
        # cannot hold budget forever).
        prov = next((pc for pc in self.cfg.providers if pc.name == self._provider(p.model)), None)
        ttl = ttl_s if ttl_s is not None else (prov.timeout_s if prov else 600.0) + self.cfg.reservation_grace_s
        state, result = await self._reserve(rid, p.holds, now.timestamp(), ttl)
        self.snapshot.update(result.states)
        if not result.ok:
            # The snapshot was stale: plan again on what the reservation saw (one retry may
            # downgrade instead of refusing), then refuse if it still does not fit.
            p = policy.plan(model=decision.model, snapshot={**self.snapshot, **result.states}, **args)
            if p.refusal is None:
                state, result = await self._reserve(rid, p.holds, now.timestamp(), ttl)
                self.snapshot.update(result.states)
            if p.refusal is not None or not result.ok:
                await self._refuse(p.refusal or self._refusal_for(result.failed_key, result.states,
                                                                  result.retry_after_s, p, now), ev, call)
        if p.downgraded_from:
            ev.actions.append({"action": "downgrade", "from": p.downgraded_from, "to": p.model,
                               "budgets": [a.budget.id for a in p.applied]})
            for a in p.applied:
                self.telemetry.budget_actions.labels(a.budget.id, "downgrade").inc()
        return Admission(rid, p, state, run.tool_counters if run else None)

    async def _run_plan(self, call: Call, dims: dict[str, str], message: str, now: datetime,
                        ev: Event) -> agents.RunPlan | None:
        caps = agents.applicable(self.run_caps, dims, call.run_id)
        if not caps:
            return None
        t = now.timestamp()
        started: dict[str, float] = {}
        snapshot: dict[str, CounterState] = {}
        try:
            for cap in caps:  # the run's clock starts at its first call, on whichever replica
                if cap.max_wall_s is not None:
                    started[cap.id] = await self.state.first_seen(agents.key(cap, "start", call.run_id), t,
                                                                  t + cap.ttl_s)
            tools = [agents.tool_counter(c, call.run_id, t + c.ttl_s) for c in caps if c.max_tool_calls is not None]
            if tools:  # added after answers, never reserved: read them fresh
                snapshot = await self.state.snapshot(tools, t)
        except StateUnavailable as e:
            if self.cfg.state_failure == "closed":
                raise StateDown("Run state is unavailable; refusing (state_failure: closed)") from e
            log.warning("run state unavailable; wall-time and tool-call caps skipped (state_failure: open): %s", e)
        run = agents.plan(caps, call.run_id, message, snapshot, started, now)
        if run.stop is not None:
            await self._stop_run(run.stop, call, ev)
        return run

    async def _stop_run(self, stop: agents.RunStop, call: Call, ev: Event) -> None:
        cap = stop.cap
        ev.actions.append({"action": "run_stop", "cap": cap.id, "limit": stop.limit})
        self.telemetry.run_stops.labels(cap.id, stop.limit).inc()
        if cap.on_cap == "escalate":
            try:
                first = await self.state.mark_fired(agents.key(cap, "escalated", call.run_id), "escalate",
                                                    time.time() + cap.ttl_s)
            except StateUnavailable:
                first = True  # better a repeated alert than a silent stop
            if first:
                ev.actions.append({"action": "run_escalate", "cap": cap.id})
                await self._post(cap.webhook, {
                    "event": "run.cap", "cap": cap.id, "limit": stop.limit, "run_id": call.run_id,
                    "workflow": call.workflow, "team": call.attribution.team, "key": call.attribution.key_id,
                    "message": stop.message, "at": datetime.now(UTC).isoformat()})
        raise RunLimitExceeded(stop.message, param=stop.limit)

    async def _reserve(self, rid: str, holds: list[Hold], now: float, ttl: float) -> tuple[State, Any]:
        try:
            return self.state, await self.state.reserve(rid, holds, now, ttl)
        except StateUnavailable as e:
            self.telemetry.state_failures.labels(self.cfg.state_failure).inc()
            if self.cfg.state_failure == "closed":
                log.error("budget state unavailable, refusing (state_failure: closed): %s", e)
                raise StateDown("Budget state is unavailable; refusing rather than risk overspending "
                                "(state_failure: closed)") from None
            cap = to_units(self.cfg.fail_open_allowance_usd, "usd")
            log.warning("budget state unavailable, serving from a local allowance (state_failure: open): %s", e)
            clamped = [h if h.kind == "bucket" or h.unit != "usd" else
                       Hold(h.key, h.kind, min(h.limit, cap), h.amount, h.expires_at, h.window_s, h.unit)
                       for h in holds]
            return self.fallback, await self.fallback.reserve(rid, clamped, now, ttl)

    def _refusal_for(self, key: str, states: dict[str, CounterState], retry: float, p: policy.BudgetPlan,
                     now: datetime) -> policy.Refusal:
        if key.startswith("run:"):  # a run counter: _refuse turns it into the run's stop
            return policy.Refusal("run_limit_exceeded", key, 0.0, key)
        if key.startswith("rl:"):
            return policy.Refusal("rate_limit_exceeded", f"Rate limit exceeded: {key.split(':')[1]} "
                                  f"({key.rsplit(':', 1)[-1]}); retry in {retry:.1f} s", max(retry, 0.001))
        a = next(a for a in p.applied if a.key == key)
        return policy.exceeded(a, states.get(key, CounterState()), now)

    async def _refuse(self, r: policy.Refusal, ev: Event, call: Call) -> None:
        if r.budget_id.startswith("run:"):  # a run cap (dollars, calls or repeats), not a budget
            counter = r.budget_id if r.budget_id.count(":") >= 3 else agents.key(
                next(c for c in self.run_caps if f"run:{c.id}" == r.budget_id), "usd", call.run_id)
            stop = agents.stop_for(counter, self.run_caps, self.snapshot.get(counter, CounterState()))
            if stop is not None:
                await self._stop_run(stop, call, ev)
        action = {"budget_exceeded": "block", "budget_deferred": "defer"}.get(r.code, "rate_limit")
        ev.actions.append({"action": action, "budget": r.budget_id})
        self.telemetry.budget_actions.labels(r.budget_id or "rate_limit", action).inc()
        err = BudgetRefused(r.message, code=r.code, headers={"Retry-After": str(max(1, round(r.retry_after_s)))})
        if r.code == "rate_limit_exceeded":
            err.type = "rate_limit_error"
        raise err

    # -- settlement -----------------------------------------------------------------------------
    async def settle(self, adm: Admission, ev: Event) -> None:
        """Spend what the call really cost; release the rest of the reservation."""
        cost, tokens = ev.cost.total_usd, ev.usage.total_tokens
        actual = {h.key: (h.amount if h.unit == "calls" else to_units(cost, "usd") if h.unit == "usd" else tokens)
                  if h.kind == "budget" else (1 if h.key.endswith(":rpm") else tokens) for h in adm.plan.holds}
        n_tools = ev.tool_calls
        if adm.tool_counters and n_tools:
            try:
                for h in adm.tool_counters:
                    await adm.state.add_spent(h, n_tools, time.time())
            except StateUnavailable as e:
                log.error("could not count %d tool calls of run %s: %s", n_tools, ev.run_id, e)
        if not adm.plan.holds:
            return
        over = [h.key for h in adm.plan.holds if h.kind == "budget" and actual[h.key] > h.amount]
        if over:  # cannot happen if the upstream honours max_tokens; say so loudly if it does
            log.error("call %s cost more than its reservation on %s", ev.event_id, over)
            ev.actions.append({"action": "overrun", "keys": over})
        if isinstance(adm.state, MemoryState):
            self.snapshot.update(await adm.state.settle(adm.rid, actual, time.time()))
            return
        # Shared state: settlements go out in batches, one round trip for many calls. Until a
        # batch lands the reservation stays held, which can only make budgets stricter.
        self._settles.append((adm.rid, actual, time.time()))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_settles())

    async def _flush_settles(self) -> None:
        await asyncio.sleep(SETTLE_BATCH_S)
        while self._settles:
            batch, self._settles = self._settles[:500], self._settles[500:]
            try:
                for states in await self.state.settle_many(batch):
                    self.snapshot.update(states)
            except StateUnavailable as e:
                # The reservations lapse after their ttl; the ledger keeps the truth.
                log.error("could not settle %d reservations (state unavailable): %s", len(batch), e)

    # -- notifications --------------------------------------------------------------------------
    def _notify(self, p: policy.BudgetPlan, ev: Event) -> None:
        for a, th, frac in p.notify:
            task = asyncio.create_task(self._fire(a, th, frac))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _fire(self, a: policy.Applied, th: Threshold, frac: float) -> None:
        try:
            first = await self.state.mark_fired(a.key, f"notify@{th.pct}", a.end.timestamp() + 86400)
        except StateUnavailable:
            return
        if not first:
            return
        b = a.budget
        payload = {"event": "budget.threshold", "budget": b.id, "name": b.label, "scope": dict(b.scope),
                   "threshold_pct": float(th.pct), "used_pct": round(frac * 100, 2), "limit": str(b.limit),
                   "unit": b.unit, "counter": a.key, "period_start": a.start.isoformat(),
                   "period_end": a.end.isoformat(), "at": datetime.now(UTC).isoformat()}
        self.fired.append(payload)
        del self.fired[:-200]
        self.telemetry.budget_actions.labels(b.id, "notify").inc()
        log.warning("budget %s reached %.1f%% (threshold %s%%)", b.id, frac * 100, th.pct)
        if b.webhook:
            await self._post(b.webhook, payload)

    async def _post(self, url: str, payload: dict[str, Any]) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        try:
            async with self._session.post(url, data=orjson.dumps(payload),
                                          headers={"Content-Type": "application/json"}) as r:
                if r.status >= 400:
                    log.warning("budget webhook %s answered HTTP %s", url, r.status)
        except (aiohttp.ClientError, TimeoutError) as e:
            log.warning("budget webhook %s failed: %s", url, e)

    async def close(self) -> None:
        if self._flusher is not None:
            await self._flusher
        if self._settles:
            await self._flush_settles()
        for t in list(self._tasks):
            await asyncio.wait_for(t, 6)
        if self._session is not None:
            await self._session.close()
        await self.state.close()
