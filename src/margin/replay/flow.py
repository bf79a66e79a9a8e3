"""The sequential replay: one request at a time in arrival order, each call in the order
gateway/pipeline.py makes it. Used when budgets, rate limits or run caps are configured, or when
the policy compresses or cascades (their side calls and escalations depend on what came before).

Per call (a request's own, then each cascade escalation):
  budgets and run caps (budgets.Admitter, if any are configured) -> exact cache (a cascade step
  still to be verified is looked up but never stored, as in the gateway) -> compression (the
  summariser is a call of its own: admitted, cached, metered) -> provider prefix cache -> settle at
  the metered cost; then, for a cascade step that is not the last, the verdict (cascade.py) decides
  whether the next step is called. A deferred request (a budget's defer) is priced in the batch
  lane as recorded: the levers after budgets are not replayed for it, nor its cascade (a deferred
  escalation is priced in the batch lane too; the gateway would re-run the whole request later)."""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from typing import Any

import orjson

from margin.domain import Call, Usage
from margin.domain.budget import to_units
from margin.policy import agents
from margin.policy import budget as budget_policy
from margin.policy import cache as cache_policy
from margin.replay.budgets import Admitted, Admitter, Refused
from margin.replay.cascade import Cascades
from margin.replay.compression import Squeeze, policy_of, scaled, squeeze
from margin.replay.costing import BATCH, STANDARD
from margin.replay.levers import ExactCache, PrefixCacheSim
from margin.replay.outcome import (
    BLOCKED,
    CACHE_HIT,
    DEFERRED,
    ESCALATION,
    SERVED,
    SUMMARY,
    Outcome,
    Progress,
    exact_one,
)

Keys = list[tuple[dict[str, Any], str]] | None


class Flow:
    def __init__(self, o: Outcome, keys: Keys, admit: bool):
        self.o, self.keys = o, keys
        pol, tr = o.policy, o.trace
        self.admitter = Admitter(o) if admit else None
        self.cache = ExactCache(pol.cfg.cache.max_entries, pol.cfg.cache.ttl_s)
        self.prefix = (PrefixCacheSim(pol.settings.prefix_cache)
                       if tr.hash_ids is not None and pol.settings.prefix_cache.enabled else None)
        self.cascades = Cascades(o)
        self.policies = {name: policy_of(c) for name, c in pol.compression.items()}
        self.index = {m: i for i, m in enumerate(o.models)}
        self.runs = tr.attr("run_id")
        self._squeezed: dict[int, Squeeze | None] = {}
        self._costs: dict[tuple[int, int, int, int, int], int] = {}
        o.compression = {"requests": 0, "summaries": 0}

    async def run(self, progress: Progress | None) -> None:
        o = self.o
        rows = [i for i in range(len(o.trace)) if o.status[i] == SERVED]
        for done, i in enumerate(rows, 1):
            if progress and done % 20_000 == 0:
                progress("requests", done, len(rows))
            await self.request(i)
        if self.admitter is not None:
            self.admitter.finish()
        o.notes += self.cascades.notes()

    async def request(self, i: int) -> None:
        chain = self.cascades.chain(i)
        step, row, model = 0, -1, int(self.o.served[i])
        while True:
            final = step >= len(chain) - 1
            answered = await self.call(i, row, model, final)
            if answered is None or final or not self.cascades.escalates(i, step, answered):
                return
            step += 1
            model = chain[step]
            o = self.o
            row = o.extras.add(i, ESCALATION, model, int(o.lane[i]), int(o.trace.input_tokens[i]),
                               int(o.trace.output_tokens[i]))

    def _call_of(self, i: int) -> Call:
        return self.o.calls[int(self.o.combo[i])]

    def _run_id(self, i: int) -> str:
        return str(self.runs[i]) if self.runs is not None else ""

    def _message(self, i: int, payload: dict[str, Any] | None = None) -> str:
        """The loop-detection hash of the call's newest message, where a run cap needs it."""
        if not self.o.policy.run_caps or not self._run_id(i):
            return ""
        if payload is None:
            tr = self.o.trace
            if tr.messages is not None and tr.messages[i] is not None:
                payload = {"messages": tr.messages[i]}
            elif tr.prompts is not None and tr.prompts[i] is not None:
                payload = {"messages": [{"role": "user", "content": tr.prompts[i]}]}
            else:
                return ""  # nothing recorded to compare: repeats cannot be detected
        return agents.message_hash("chat", payload)

    async def _admit(self, i: int, row: int, call: Call, model: int, bound: int, max_tokens: int | None,
                     message: str) -> Admitted | Refused | None:
        """Budgets and run caps for one call (None: none configured); applies what they decide."""
        if self.admitter is None:
            return None
        o = self.o
        when = o.start + timedelta(seconds=float(o.trace.arrival_s[i]))
        a = await self.admitter.admit(call, self._run_id(i), o.models[model], bound, max_tokens, message, when)
        if isinstance(a, Refused):
            o.set("status", i, row, a.status)
            o.set("served", i, row, self.index[a.model])
            if a.status == DEFERRED:
                o.set("lane", i, row, BATCH)
            if a.stop is not None:
                o.stops[i if row < 0 else len(o.trace) + row] = a.stop
            return a
        if a.downgraded:
            o.set("served", i, row, self.index[a.model])
            o.set("downgraded", i, row, True)
        if a.max_tokens is not None and o.get("output", i, row) > a.max_tokens:
            o.set("output", i, row, a.max_tokens)
            o.set("truncated", i, row, True)
            self.admitter.truncated(a, when)
        return a

    async def call(self, i: int, row: int, model: int, final: bool) -> int | None:
        """Request ``i``'s call ``row`` (-1: its own) meant for ``model``; the model that answered
        (None: refused, deferred or a cache hit)."""
        o, tr = self.o, self.o.trace
        now = float(tr.arrival_s[i])
        call = self._call_of(i)
        max_tokens = (int(tr.max_tokens[i]) if tr.max_tokens is not None and tr.max_tokens[i]
                      else o.policy.settings.max_tokens)
        adm = await self._admit(i, row, call, model, _bound(o, i), max_tokens, self._message(i))
        if isinstance(adm, Refused):
            return None
        served = int(o.get("served", i, row))
        if exact_one(o, self.keys, self.cache, i, now, row, store=final):
            await self._settle(adm, 0, 0, 0, now)  # a hit settles at zero (pipeline: cache before send)
            return None
        recorded = int(tr.input_tokens[i])
        sq = self._squeeze(i)
        if sq is not None:
            summarised = sq.summary is not None and await self._summarise(i, sq, now)
            sent = sq.sent(summarised)
            o.set("compressed", i, row, scaled(recorded, sq.before, sent))
            o.compression["requests"] += int(sent < sq.before and row < 0)
        inp = int(o.get("compressed", i, row))
        cached = int(o.cached[i]) if row < 0 else 0  # recorded provider cache reads: the request's own call
        if self.prefix is not None and tr.hash_ids is not None:
            cached = self.prefix.use(served, tr.hash_ids[i], recorded, now)
        cached = min(cached, inp)  # a compressed prompt cannot read more than it holds
        o.set("cached", i, row, cached)
        if isinstance(adm, Admitted):
            out = int(o.get("output", i, row))
            tools = int(tr.tool_calls[i]) if tr.tool_calls is not None and row < 0 else 0
            await self._settle(adm, self._cost(served, int(o.get("lane", i, row)), inp, cached, out), inp + out,
                               tools, now)
        return served

    def _squeeze(self, i: int) -> Squeeze | None:
        if i not in self._squeezed:
            o, tr = self.o, self.o.trace
            name = self._call_of(i).requested_model
            msgs = tr.messages[i] if tr.messages is not None else None
            settings = o.policy.compression.get(name)
            self._squeezed[i] = (squeeze(msgs, settings, self.policies[name])
                                 if settings is not None and msgs is not None else None)
        return self._squeezed[i]

    async def _summarise(self, i: int, sq: Squeeze, now: float) -> bool:
        """The summariser's call on the dropped turns (as gateway/sidecalls.SideCalls.summarise:
        the request's attribution and run, temperature 0); False if it was refused."""
        assert sq.summary is not None
        o, s = self.o, sq.summary
        model = self.index[s.model]
        row = o.extras.add(i, SUMMARY, model, STANDARD, s.input_tokens, s.max_tokens)
        o.compression["summaries"] += 1
        call = dataclasses.replace(self._call_of(i), requested_model=s.model, max_tokens=s.max_tokens,
                                   has_tools=False)
        body = {"model": s.model, **s.payload}
        bound = budget_policy.input_bound(len(orjson.dumps(body)), len(s.payload["messages"]))
        adm = await self._admit(i, row, call, model, bound, s.max_tokens, self._message(i, s.payload))
        if isinstance(adm, Refused):
            if adm.status == DEFERRED:  # a side call cannot wait: the gateway goes on without a summary
                o.extras.status[row], o.extras.lane[row] = BLOCKED, STANDARD
            return False
        served = o.extras.served[row]
        cfg = o.policy.cfg.cache
        if cfg.enabled:
            key = cache_policy.cache_key("chat", o.models[served], s.payload,
                                         cache_policy.tenant(call.attribution, cfg.scope))
            if self.cache.get(key, now) is not None:
                o.extras.status[row] = CACHE_HIT
                await self._settle(adm, 0, 0, 0, now)
                return True
            self.cache.put(key, True, now)
        if isinstance(adm, Admitted):
            out = o.extras.output[row]
            await self._settle(adm, self._cost(served, STANDARD, s.input_tokens, 0, out), s.input_tokens + out, 0,
                               now)
        return True

    def _cost(self, model: int, lane: int, inp: int, cached: int, out: int) -> int:
        """The call's metered cost in budget units (exact), memoised per distinct call."""
        k = (model, lane, inp, cached, out)
        if k not in self._costs:
            pol, name = self.o.policy, self.o.models[model]
            rates = pol.batch_rates(name) if lane == BATCH else pol.prices.rates(name)
            self._costs[k] = to_units(rates.cost(Usage(inp, out, cached)).total_usd, "usd")
        return self._costs[k]

    async def _settle(self, adm: Admitted | None, cost: int, tokens: int, tools: int, now: float) -> None:
        if isinstance(adm, Admitted) and self.admitter is not None:
            await self.admitter.settle(adm, cost, tokens, tools, now)


def _bound(o: Outcome, i: int) -> int:
    """The prompt bound the gateway reserves on: from the body's UTF-8 size where messages were
    recorded, else the recorded input tokens (exact, so tighter than the gateway could be)."""
    tr = o.trace
    if tr.messages is not None and tr.messages[i] is not None:
        msgs = tr.messages[i] or []
        return budget_policy.input_bound(len(orjson.dumps({"messages": msgs})), len(msgs))
    return int(tr.input_tokens[i])
