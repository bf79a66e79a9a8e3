"""Replay proof of the autoscaling advice: the serving simulator (sim.py) with a replica count that
follows `planner.autoscale` over time, against a fixed pool sized for the peak.

Every `interval_s` of simulated time the controller reads the same live signals the gateway reads
from a real pool (arrivals over the last `window_s`, mean lengths of the requests completed in it,
queued and running requests now, p95 TTFT/TPOT of the window) and publishes the stabilised
recommendation. A replica asked for serves `startup_s` later (a cold start); one no longer needed
takes no new requests and stops when its last request is done (drained, never cut). Arrivals go
to the least-loaded serving replica, as in sim.py. Replica-hours are billed from the moment a
replica is asked for until it stops (or the end of the replay), so cold starts and drains are paid."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import numpy as np

from margin.planner.autoscale import AutoscaleSpec, PoolSignals, recommend, stabilise
from margin.planner.perf import PlannerError
from margin.replay.sim import SimConfig, SimResult, Simulator, _Replica, _Seq, find_replicas
from margin.replay.traces import Trace


@dataclass(frozen=True)
class ControlConfig:
    interval_s: float = 30.0  # how often the advice is recomputed
    window_s: float = 60.0  # live signals are measured over this
    scale_down_after_s: float = 300.0  # the advice falls only after a lower need held this long
    startup_s: float = 60.0  # from "add a replica" to its first request (cold start)


@dataclass
class _Member:
    rep: _Replica
    asked: float  # when it was asked for (billing starts)
    ready: float  # when it can take requests
    retired: float | None = None  # when it stopped taking requests
    stopped: float | None = None  # when it was switched off (drained)


@dataclass
class AutoscaleRun:
    result: SimResult  # latency percentiles etc. (its cost fields are for a fixed pool: use these below)
    replica_hours: float
    cost_usd: Decimal
    peak_replicas: int
    mean_replicas: float
    timeline: list[dict[str, Any]] = field(default_factory=list)  # one entry per control tick

    def to_dict(self) -> dict[str, Any]:
        r = self.result.to_dict()
        # A fixed pool's figures (cost, idle energy and utilisation over every replica for the whole span).
        for k in ("cost_usd", "usd_per_million_output", "replicas", "gpu_utilisation", "energy_j",
                  "joules_per_output_token"):
            r.pop(k, None)
        return {"replica_hours": self.replica_hours, "cost_usd": format(self.cost_usd, "f"),
                "peak_replicas": self.peak_replicas, "mean_replicas": self.mean_replicas, **r,
                "timeline": self.timeline}


class AutoscaledSimulator(Simulator):
    """sim.Simulator whose pool grows and shrinks on the autoscaling advice."""

    def __init__(self, spec: AutoscaleSpec, cfg: SimConfig, control: ControlConfig):
        super().__init__(spec.dep, cfg)
        self.spec, self.control = spec, control

    def run_autoscaled(self, trace: Trace, initial: int | None = None) -> AutoscaleRun:
        t_start = time.perf_counter()
        c, n = self.control, len(trace)
        self.first_t = np.full(n, np.nan)
        self.done_t = np.full(n, np.nan)
        self.cached_tokens = 0
        self.blocks = trace.hash_ids if self.cfg.prefix_cache else None
        arr, inp, out = trace.arrival_s, trace.input_tokens, trace.output_tokens
        first = initial if initial is not None else self._advice_at(trace, c.window_s, [], 0)[0]
        pool = [_Member(_Replica(self.kv_cap), 0.0, 0.0) for _ in range(max(1, first))]
        history: list[tuple[float, int]] = [(0.0, len(pool))]  # the start counts: no scale-down at the first tick
        timeline: list[dict[str, Any]] = []
        seen = np.zeros(n)
        rejected = np.zeros(n, dtype=bool)
        ctx_limit = min(self.kv_cap, self.dep.model.context)
        tick = c.interval_s
        for i in range(n):
            ta = float(arr[i])
            while tick <= ta:
                self._control(trace, pool, tick, history, timeline)
                tick += c.interval_s
            for m in pool:
                self._advance(m.rep, ta)
            self._switch_off_drained(pool, ta)
            seen[i] = sum(m.rep.load for m in pool)
            if int(inp[i]) + int(out[i]) > ctx_limit:
                rejected[i] = True
                continue
            m = self._dispatch(pool, ta)
            if m.rep.load == 0:
                m.rep.t = max(m.rep.t, ta, m.ready)
            m.rep.waiting.append(_Seq(i, ta, max(1, int(inp[i])), max(1, int(out[i]))))
        for m in pool:
            self._advance(m.rep, float("inf"))
        reps = [m.rep for m in pool]
        res = self._result(trace, reps, rejected, seen, time.perf_counter() - t_start)
        return self._bill(res, pool, timeline)

    # -- control ------------------------------------------------------------------------------
    def _signals(self, trace: Trace, pool: list[_Member], now: float) -> PoolSignals:
        w = self.control.window_s
        arr = trace.arrival_s
        lo = max(0.0, now - w)
        arrivals = int(np.searchsorted(arr, now, "right") - np.searchsorted(arr, lo, "right"))
        done = (self.done_t > lo) & (self.done_t <= now)
        firsts = (self.first_t > lo) & (self.first_t <= now)
        ttft = self.first_t[firsts] - arr[firsts]
        multi = done & (trace.output_tokens > 1)
        tpot = (self.done_t[multi] - self.first_t[multi]) / (trace.output_tokens[multi] - 1)
        serving = [m for m in pool if m.retired is None and m.ready <= now]
        q = float(self.spec.percentile[1:])
        return PoolSignals(
            window_s=min(w, now) if now > 0 else w, arrivals=arrivals, replicas=len(serving),
            starting=sum(1 for m in pool if m.retired is None and m.ready > now),
            waiting=float(sum(len(m.rep.waiting) for m in pool)),
            running=float(sum(len(m.rep.prefilling) + len(m.rep.decoding) for m in pool)),
            mean_input_tokens=float(trace.input_tokens[done].mean()) if done.any() else None,
            mean_output_tokens=float(trace.output_tokens[done].mean()) if done.any() else None,
            ttft_s=float(np.percentile(ttft, q)) if ttft.size else None,
            tpot_s=float(np.percentile(tpot, q)) if tpot.size else None,
            latency_samples=int(min(ttft.size, tpot.size) if tpot.size else ttft.size))

    def _advice_at(self, trace: Trace, now: float, pool: list[_Member], current: int) -> tuple[int, Any]:
        """Before the replay starts (no completions yet) the lengths come from the first window's arrivals."""
        if pool:
            s = self._signals(trace, pool, now)
        else:
            k = int(np.searchsorted(trace.arrival_s, now, "right"))
            s = PoolSignals(window_s=now, arrivals=k, replicas=current,
                            mean_input_tokens=float(trace.input_tokens[:k].mean()) if k else None,
                            mean_output_tokens=float(trace.output_tokens[:k].mean()) if k else None)
        a = recommend(s, self.spec)
        return a.replicas, a

    def _control(self, trace: Trace, pool: list[_Member], now: float, history: list[tuple[float, int]],
                 timeline: list[dict[str, Any]]) -> None:
        for m in pool:
            self._advance(m.rep, now)
        self._switch_off_drained(pool, now)
        active = [m for m in pool if m.retired is None]
        raw, advice = self._advice_at(trace, now, pool, len([m for m in active if m.ready <= now]))
        history.append((now, raw))
        target = stabilise(history, now, self.control.scale_down_after_s)
        while len(active) < target:  # bring a draining replica back (it is warm), else cold-start one
            back = next((m for m in pool if m.retired is not None and m.stopped is None), None)
            if back is not None:
                back.retired = None
                active.append(back)
                continue
            rep = _Replica(self.kv_cap)
            rep.t = now + self.control.startup_s
            m = _Member(rep, now, now + self.control.startup_s)
            pool.append(m)
            active.append(m)
        if len(active) > target:  # retire the ones still starting first, then the least loaded
            for m in sorted(active, key=lambda x: (x.ready <= now, x.rep.load))[: len(active) - target]:
                m.retired = now
        self._switch_off_drained(pool, now)
        timeline.append({"t": now, "raw": raw, "recommended": target,
                         "serving": sum(1 for m in pool if m.retired is None and m.ready <= now),
                         "billed": sum(1 for m in pool if m.stopped is None), "limited_by": advice.limited_by,
                         "arrival_rps": round(advice.arrival_rps, 4)})

    @staticmethod
    def _stop_time(m: _Member) -> float:
        """A retired replica stops when its last step after retirement ends (never before it was
        retired; a cold start cancelled before it served anything stops at once)."""
        assert m.retired is not None
        return max(m.retired, m.rep.t) if m.rep.steps else m.retired

    def _switch_off_drained(self, pool: list[_Member], now: float) -> None:
        for m in pool:
            if m.retired is not None and m.stopped is None and m.rep.load == 0:
                m.stopped = self._stop_time(m)

    @staticmethod
    def _dispatch(pool: list[_Member], now: float) -> _Member:
        serving = [m for m in pool if m.retired is None and m.ready <= now]
        if serving:
            return min(serving, key=lambda m: m.rep.load)
        starting = [m for m in pool if m.retired is None]  # none ready yet: the first to be
        if not starting:
            raise PlannerError("autoscaler left no replica")
        return min(starting, key=lambda m: (m.ready, m.rep.load))

    def _bill(self, res: SimResult, pool: list[_Member], timeline: list[dict[str, Any]]) -> AutoscaleRun:
        end = res.span_s
        seconds = 0.0
        for m in pool:
            stop = m.stopped if m.stopped is not None else end
            if m.retired is not None and m.stopped is None:  # still draining at the end: until its work ended
                stop = self._stop_time(m)
            seconds += max(0.0, min(stop, end) - m.asked)
        hours = seconds / 3600
        cost = self.spec.usd_per_replica_hour * Decimal(str(round(hours, 6)))
        counts = [e["billed"] for e in timeline] or [len(pool)]
        return AutoscaleRun(res, hours, cost, max(counts), seconds / end if end else float(len(pool)), timeline)


@dataclass
class Comparison:
    fixed_replicas: int | None  # fewest fixed replicas meeting the SLO (the peak-sized pool)
    fixed: SimResult | None
    fixed_cost_usd: Decimal | None
    autoscaled: AutoscaleRun
    pct: str
    slo_met_fixed: bool
    slo_met_autoscaled: bool

    @property
    def saving_usd(self) -> Decimal | None:
        return None if self.fixed_cost_usd is None else self.fixed_cost_usd - self.autoscaled.cost_usd

    def to_dict(self) -> dict[str, Any]:
        f = self.fixed
        return {
            "pct": self.pct, "fixed_replicas": self.fixed_replicas,
            "fixed_replica_hours": (self.fixed_replicas or 0) * (f.span_s / 3600 if f else 0.0),
            "fixed_cost_usd": None if self.fixed_cost_usd is None else format(self.fixed_cost_usd, "f"),
            "fixed_ttft_s": f.ttft_s if f else None, "fixed_tpot_s": f.tpot_s if f else None,
            "slo_met_fixed": self.slo_met_fixed, "slo_met_autoscaled": self.slo_met_autoscaled,
            "autoscaled": self.autoscaled.to_dict(),
            "saving_usd": None if self.saving_usd is None else format(self.saving_usd, "f"),
        }


def compare(trace: Trace, spec: AutoscaleSpec, cfg: SimConfig | None = None, control: ControlConfig | None = None,
            pct: str = "p99", max_replicas: int = 256) -> Comparison:
    """The fewest fixed replicas meeting the SLO over the whole trace (sized for its peak), against
    the pool following the advice; both billed at the spec's price per replica-hour to the same end."""
    cfg = cfg or SimConfig(max_seqs=spec.max_batch or SimConfig().max_seqs)
    control = control or ControlConfig()
    search = find_replicas(trace, spec.dep, cfg, spec.ttft_slo_s, spec.tpot_slo_s, pct, max_replicas)
    fixed = search.tried.get(search.replicas) if search.replicas else None
    auto = AutoscaledSimulator(spec, cfg, control).run_autoscaled(trace)
    fixed_cost = None
    if fixed is not None and search.replicas:
        fixed_cost = spec.usd_per_replica_hour * search.replicas * Decimal(str(round(fixed.span_s / 3600, 6)))
    return Comparison(search.replicas, fixed, fixed_cost, auto, pct,
                      fixed is not None and fixed.meets(spec.ttft_slo_s, spec.tpot_slo_s, pct),
                      auto.result.meets(spec.ttft_slo_s, spec.tpot_slo_s, pct))
