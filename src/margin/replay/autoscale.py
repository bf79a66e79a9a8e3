"""Replay proof of the autoscaling advice: the serving simulator (sim.py) with a replica count that
follows `planner.autoscale` over time, against a fixed pool sized for the peak.

Every `interval_s` of simulated time the controller reads the same live signals the gateway reads
from a real pool (arrivals over the last `window_s`, mean lengths of the requests completed in the
last `lengths_window_s`, queued and running requests now, TTFT/TPOT of the window at the SLO
percentile) and publishes the stabilised
recommendation. A replica asked for serves `startup_s` later (a cold start); one no longer needed
takes no new requests and stops when its last request is done (drained, never cut). Arrivals go
to the least-loaded serving replica, as in sim.py. Replica-hours are billed from the moment a
replica is asked for until it stops (or the end of the replay), so cold starts and drains are paid."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Any

import numpy as np

from margin.planner.autoscale import AutoscaleSpec, PoolSignals, recommend, stabilise
from margin.planner.perf import PlannerError
from margin.replay.sim import SimConfig, SimResult, Simulator, _Replica, _Seq
from margin.replay.traces import Trace


@dataclass(frozen=True)
class ControlConfig:
    interval_s: float = 30.0  # how often the advice is recomputed
    window_s: float = 60.0  # live signals are measured over this
    scale_down_after_s: float = 300.0  # the advice falls only after a lower need held this long
    startup_s: float = 60.0  # from "add a replica" to its first request (cold start)
    lengths_window_s: float = 600.0  # the mix of prompt/answer lengths is averaged over this (it drifts slowly)
    trend_window_s: float = 300.0  # a slow ramp is looked for over this (and a step over window_s)


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
        def halves(span: float) -> tuple[int, int, float]:
            span = min(span, now)
            a, m, b = np.searchsorted(arr, [now - span, now - span / 2, now], "right")
            return int(m - a), int(b - m), span

        trends = (halves(w), halves(self.control.trend_window_s))
        done = (self.done_t > lo) & (self.done_t <= now)
        mix = (self.done_t > now - self.control.lengths_window_s) & (self.done_t <= now)
        # Latency is judged on requests that arrived once the newest replica served: older ones
        # show a shortage that has already been answered (else each breach would add replicas twice).
        epoch = max((m.ready for m in pool if m.ready <= now), default=0.0)
        fresh = arr >= epoch
        firsts = (self.first_t > lo) & (self.first_t <= now) & fresh
        ttft = self.first_t[firsts] - arr[firsts]
        multi = done & fresh & (trace.output_tokens > 1)
        tpot = (self.done_t[multi] - self.first_t[multi]) / (trace.output_tokens[multi] - 1)
        serving = [m for m in pool if m.retired is None and m.ready <= now]
        q = float(self.spec.percentile[1:])
        return PoolSignals(
            window_s=min(w, now) if now > 0 else w, arrivals=arrivals, trends=trends,
            replicas=len(serving),
            starting=sum(1 for m in pool if m.retired is None and m.ready > now),
            waiting=float(sum(len(m.rep.waiting) for m in pool)),
            running=float(sum(len(m.rep.prefilling) + len(m.rep.decoding) for m in pool)),
            mean_input_tokens=float(trace.input_tokens[mix].mean()) if mix.any() else None,
            mean_output_tokens=float(trace.output_tokens[mix].mean()) if mix.any() else None,
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
        timeline.append({"t": now, "raw": raw, "need": advice.need, "isl": advice.isl, "recommended": target,
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
class FixedPool:
    replicas: int
    result: SimResult  # the whole trace on this many replicas
    cost_usd: Decimal
    slo_met: bool  # over the whole trace

    @property
    def replica_hours(self) -> float:
        return self.replicas * self.result.span_s / 3600

    def to_dict(self) -> dict[str, Any]:
        return {"replicas": self.replicas, "replica_hours": self.replica_hours, "cost_usd": format(self.cost_usd, "f"),
                "ttft_s": self.result.ttft_s, "tpot_s": self.result.tpot_s, "slo_met": self.slo_met}


@dataclass
class Comparison:
    """The pool following the advice against two fixed pools: `peak_sized`, the fewest replicas
    meeting the SLO over the trace's busiest `peak_window_s` (what a capacity plan buys for the
    peak), and `oracle`, the fewest meeting it over the whole trace, chosen with hindsight (it lets
    the quiet hours absorb the peak's slow requests, which no plan can count on in advance)."""

    autoscaled: AutoscaleRun
    slo_met_autoscaled: bool
    peak_sized: FixedPool | None
    oracle: FixedPool | None
    pct: str
    peak_window: tuple[float, float]  # (start, end) of the busiest window, seconds into the trace

    def saving_usd(self, vs: FixedPool | None) -> Decimal | None:
        return None if vs is None else vs.cost_usd - self.autoscaled.cost_usd

    def to_dict(self) -> dict[str, Any]:
        def saving(vs: FixedPool | None) -> str | None:
            v = self.saving_usd(vs)
            return None if v is None else format(v, "f")

        return {"pct": self.pct, "slo_met_autoscaled": self.slo_met_autoscaled, "autoscaled": self.autoscaled.to_dict(),
                "peak_window_s": list(self.peak_window),
                "peak_sized": self.peak_sized.to_dict() if self.peak_sized else None,
                "oracle": self.oracle.to_dict() if self.oracle else None,
                "saving_vs_peak_sized_usd": saving(self.peak_sized), "saving_vs_oracle_usd": saving(self.oracle)}


def busiest(trace: Trace, window_s: float) -> tuple[Trace, float]:
    """The requests of the `window_s` with the most arrivals (times shifted to start at 0), and its start."""
    arr = trace.arrival_s
    ends = np.searchsorted(arr, arr + window_s, "left")
    i = int(np.argmax(ends - np.arange(len(arr))))
    sub = trace.take(np.arange(i, int(ends[i])))
    t0 = float(arr[i])
    return replace(sub, arrival_s=sub.arrival_s - t0), t0


def fewest_fixed(trace: Trace, spec: AutoscaleSpec, cfg: SimConfig, pct: str, start: int,
                 max_replicas: int = 256) -> tuple[int | None, dict[int, SimResult]]:
    """The fewest fixed replicas whose replay meets the SLO at `pct`, searched from `start` (the
    autoscaled peak is a good guess: few runs, and only one under-sized one, the slowest to simulate).
    Same answer as sim.find_replicas (more replicas never make it worse under least-loaded dispatch)."""
    tried: dict[int, SimResult] = {}

    def ok(n: int) -> bool:
        if n not in tried:
            tried[n] = Simulator(spec.dep, SimConfig(n, cfg.max_batched_tokens, cfg.max_seqs, cfg.prefix_cache)
                                 ).run(trace)
        return tried[n].meets(spec.ttft_slo_s, spec.tpot_slo_s, pct)

    n = max(1, start)
    if ok(n):
        while n > 1 and ok(n - 1):
            n -= 1
        return n, tried
    if tried[n].rejected:
        return None, tried  # requests no replica can hold
    while n < max_replicas:
        n += 1
        if ok(n):
            return n, tried
    return None, tried


def compare(trace: Trace, spec: AutoscaleSpec, cfg: SimConfig | None = None, control: ControlConfig | None = None,
            pct: str = "p99", peak_window_s: float = 600.0, oracle: bool = True,
            max_replicas: int = 256) -> Comparison:
    """The pool following the advice against the peak-sized and (optionally) the oracle fixed pool;
    all billed at the spec's price per replica-hour until their last request is done."""
    cfg = cfg or SimConfig(max_seqs=spec.max_batch or SimConfig().max_seqs)
    control = control or ControlConfig()
    auto = AutoscaledSimulator(spec, cfg, control).run_autoscaled(trace)
    met = auto.result.meets(spec.ttft_slo_s, spec.tpot_slo_s, pct)

    def fixed(n: int | None, known: dict[int, SimResult]) -> FixedPool | None:
        if n is None:
            return None
        r = known.get(n) or Simulator(spec.dep, SimConfig(n, cfg.max_batched_tokens, cfg.max_seqs,
                                                          cfg.prefix_cache)).run(trace)
        cost = spec.usd_per_replica_hour * n * Decimal(str(round(r.span_s / 3600, 6)))
        return FixedPool(n, r, cost, r.meets(spec.ttft_slo_s, spec.tpot_slo_s, pct))

    peak, t0 = busiest(trace, peak_window_s)
    n_peak, _ = fewest_fixed(peak, spec, cfg, pct, auto.peak_replicas, max_replicas)
    peak_sized = fixed(n_peak, {})
    best = None
    if oracle:
        known = {n_peak: peak_sized.result} if peak_sized is not None and n_peak is not None else {}
        n_best, tried = fewest_fixed(trace, spec, cfg, pct, n_peak or auto.peak_replicas, max_replicas)
        best = fixed(n_best, {**tried, **known})
    return Comparison(auto, met, peak_sized, best, pct, (t0, t0 + peak_window_s))
