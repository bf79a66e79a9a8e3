"""Autoscaling advice for a self-hosted pool: how many replicas meet its SLO now (pure arithmetic).

Live signals (request rate, mean prompt and answer lengths, queue depth, observed latency) meet the
planner's step-time model: `perf.throughput` gives the request rate one replica sustains at those
lengths while meeting the TTFT/TPOT SLO. The recommendation is the largest of

- rate:    arrival rate / (per-replica SLO rate x target utilisation)
- trend:   the same for the rate expected `lead_s` ahead (a replica's cold start), when the second
           half of the window, or of a longer span (a slow ramp), saw significantly more arrivals
           than the first (beyond 3 Poisson standard deviations: noise does not buy replicas)
- queue:   (arrival rate + queued requests / drain_s) / per-replica SLO rate   (drain a backlog)
- latency: one more than serving now, while the window's observed TTFT or TPOT at the SLO
           percentile breaks the SLO and no replica is already starting (the model's error shows
           up here, so live latency corrects it)

The per-replica SLO rate is not the planner's steady-state figure itself. That one runs every
replica at the largest batch B* whose TPOT/TTFT meet the SLO; but requests arrive at random, so
the batch a replica holds fluctuates around its mean L (Little: L = rate x latency), roughly as a
Poisson count (sd sqrt(L)). For the SLO to hold at percentile p, L + z_p sqrt(L) <= B*, so one
replica is loaded only up to L* = ((sqrt(z_p^2 + 4 B*) - z_p) / 2)^2 (p99, z = 2.33: B* = 20 gives
L* = 11.9, 60 %; B* = 200 gives 168, 84 %): small batches need proportionally more headroom.

bounded by min/max replicas. Rising is immediate; `stabilise` lets it fall only once a lower
value has held for `scale_down_after_s` (as the HPA's scale-down stabilisation window does), so
a consumer (KEDA, an HPA on `margin_recommended_replicas`) does not flap. The same functions drive
the replay proof (replay/autoscale.py)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from margin.planner.perf import Deployment, PlannerError, deployment, throughput

DEFAULT_ISL, DEFAULT_OSL = 512, 128  # lengths assumed before any request was seen
Z = {"p50": 0.0, "p90": 1.2816, "p95": 1.6449, "p99": 2.3263}  # standard normal quantiles
MIN_LATENCY_SAMPLES = 10  # fewer observations than this: p95 is noise, not a signal


@dataclass(frozen=True)
class AutoscaleSpec:
    """What a pool runs and the SLO its replica count must meet."""

    dep: Deployment
    ttft_slo_s: float | None
    tpot_slo_s: float | None
    min_replicas: int = 1
    max_replicas: int = 64
    target_utilisation: float = 0.9
    max_batch: int | None = None
    usd_per_replica_hour: Decimal = Decimal(0)
    drain_s: float = 60.0
    percentile: str = "p99"  # the SLO holds at this percentile of requests
    lead_s: float = 60.0  # a new replica's cold start: on a significant rise, plan this far ahead


def make_spec(model: str, gpu: str, tp: int = 1, precision: str = "bf16", *, ttft_slo_s: float | None,
              tpot_slo_s: float | None, min_replicas: int = 1, max_replicas: int = 64,
              target_utilisation: float = 0.9, max_batch: int | None = None,
              usd_per_replica_hour: Decimal | None = None, drain_s: float = 60.0,
              percentile: str = "p99", lead_s: float = 60.0) -> AutoscaleSpec:
    """Resolve catalogue ids (CatalogError / PlannerError with the reason on bad ones); the price of
    a replica defaults to the catalogue's on-demand GPU price x tp."""
    if percentile not in Z:
        raise PlannerError(f"SLO percentile {percentile!r}: use one of {', '.join(Z)}")
    dep = deployment(model, gpu, tp, precision)
    price = usd_per_replica_hour if usd_per_replica_hour is not None else dep.gpu.usd_per_hour * tp
    return AutoscaleSpec(dep, ttft_slo_s, tpot_slo_s, min_replicas, max_replicas, target_utilisation, max_batch,
                         price, drain_s, percentile, lead_s)


@dataclass(frozen=True)
class PoolSignals:
    """A pool's live state over the last `window_s` seconds."""

    window_s: float
    arrivals: int  # requests that arrived in the window
    replicas: int  # replicas serving now
    # Arrival counts in the two halves of some recent spans, as (first half, second half, span s):
    # a short span sees a step, a long one a steady ramp.
    trends: tuple[tuple[int, int, float], ...] = ()
    starting: int = 0  # replicas asked for that do not serve yet (cold starts)
    waiting: float = 0.0  # requests queued now (all replicas)
    running: float = 0.0  # requests being served now
    mean_input_tokens: float | None = None  # of requests completed in the window
    mean_output_tokens: float | None = None
    engine_generation_tps: float | None = None  # tokens/s the engines generated (every client, not only margin's)
    ttft_s: float | None = None  # observed in the window, at the spec's SLO percentile
    tpot_s: float | None = None
    latency_samples: int = 0


@dataclass(frozen=True)
class Advice:
    replicas: int  # recommended now (before stabilisation)
    current: int
    need: float  # replicas' worth of work by the rate and queue rules (before rounding up)
    arrival_rps: float
    capacity_rps: float  # one replica's SLO-meeting request rate at these lengths (planner)
    isl: int
    osl: int
    usd_per_hour: Decimal  # of the recommended replicas
    limited_by: str  # rate | queue | latency | min | max | idle | slo_unreachable
    why: str

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["usd_per_hour"] = format(self.usd_per_hour, "f")
        return d


def headroom_batch(b_max: float, z: float) -> float:
    """The mean batch L whose Poisson fluctuation stays within b_max at the quantile z:
    L + z sqrt(L) = b_max."""
    if b_max <= 0:
        return 0.0
    return min(b_max, ((math.sqrt(z * z + 4 * b_max) - z) / 2) ** 2)  # min: rounding at z = 0


def capacity_rps(spec: AutoscaleSpec, isl: int, osl: int) -> tuple[float, bool]:
    """Requests/s one replica serves within the SLO at its percentile, at these lengths, and
    whether it can at all (one request alone may already miss it)."""
    dep = spec.dep
    osl = max(1, min(osl, dep.model.context - 1))
    isl = max(1, min(isl, dep.model.context - osl))
    r = throughput(dep, isl, osl, ttft_slo=spec.ttft_slo_s, tpot_slo=spec.tpot_slo_s, max_batch=spec.max_batch)
    if not r.meets_slo:  # even alone a request misses it: one request per replica is the best there is
        return r.requests_per_s, False
    # r.requests_per_s = B* / latency at B*; a mean batch of L* (latency no worse) gives L* / latency.
    return headroom_batch(r.batch, Z[spec.percentile]) / r.latency_s, True


def recommend(s: PoolSignals, spec: AutoscaleSpec) -> Advice:
    isl = round(s.mean_input_tokens) if s.mean_input_tokens else DEFAULT_ISL
    osl = round(s.mean_output_tokens) if s.mean_output_tokens else DEFAULT_OSL
    rate = s.arrivals / s.window_s if s.window_s > 0 else 0.0
    if s.engine_generation_tps and osl:  # the engines also see traffic that did not come through margin
        rate = max(rate, s.engine_generation_tps / osl)
    try:
        cap, reachable = capacity_rps(spec, isl, osl)
    except PlannerError as e:
        return _advice(s, spec, s.replicas or spec.min_replicas, 0.0, rate, 0.0, isl, osl, "slo_unreachable",
                       f"planner cannot model it: {e}")
    needs: list[tuple[int, str, str]] = []  # (replicas, limited_by, why)
    need = 0.0
    if cap > 0:
        need = rate / (cap * spec.target_utilisation)
        needs.append((math.ceil(need - 1e-9), "rate",
                      f"{rate:.3g} req/s over {cap:.3g} req/s per replica at {spec.target_utilisation:.0%}"))
        ahead = _ahead(s, spec)
        if ahead > rate:
            need = max(need, ahead / (cap * spec.target_utilisation))
            needs.append((math.ceil(ahead / (cap * spec.target_utilisation) - 1e-9), "trend",
                          f"rising: {ahead:.3g} req/s expected in {spec.lead_s:g} s (now {rate:.3g})"))
        if s.waiting > 0:
            need = max(need, (rate + s.waiting / spec.drain_s) / cap)
            needs.append((math.ceil((rate + s.waiting / spec.drain_s) / cap - 1e-9), "queue",
                          f"{s.waiting:g} queued, drained within {spec.drain_s:g} s"))
    breach = _breach(s, spec)
    if breach and not s.starting:  # while replicas are starting, the breach is being answered already
        needs.append((s.replicas + 1, "latency", breach))
    if rate == 0 and s.waiting == 0 and s.running == 0:
        needs.append((spec.min_replicas, "idle", "no traffic in the window"))
    n, limited, why = max(needs, key=lambda x: x[0]) if needs else (spec.min_replicas, "idle", "no signal")
    if n < spec.min_replicas:
        n, limited, why = spec.min_replicas, "min", f"min_replicas ({why})"
    if n > spec.max_replicas:
        n, limited, why = spec.max_replicas, "max", f"capped at max_replicas {spec.max_replicas} (needs {n}: {why})"
    if not reachable:  # said first: no replica count meets this SLO
        limited, why = "slo_unreachable", (f"one replica misses the SLO even alone at isl {isl} / osl {osl}: "
                                           f"more replicas cannot fix latency; sized for one request each ({why})")
    return _advice(s, spec, n, need, rate, cap, isl, osl, limited, why)


def _ahead(s: PoolSignals, spec: AutoscaleSpec) -> float:
    """The arrival rate `lead_s` from now, by a linear trend through the two halves of a span
    whose second half was significantly busier than its first (beyond 3 Poisson standard
    deviations, so noise alone almost never buys a replica); 0 when no span rises."""
    best = 0.0
    for n1, n2, span in s.trends:
        if span <= 0 or spec.lead_s <= 0 or n2 - n1 <= 3 * math.sqrt(n1 + n2):
            continue
        half = span / 2
        slope = (n2 - n1) / half / half  # req/s per second
        best = max(best, n2 / half + slope * (half / 2 + spec.lead_s))  # recent half's midpoint -> now + lead
    return best


def _breach(s: PoolSignals, spec: AutoscaleSpec) -> str:
    if s.latency_samples < MIN_LATENCY_SAMPLES:
        return ""
    p = spec.percentile
    if spec.ttft_slo_s is not None and s.ttft_s is not None and s.ttft_s > spec.ttft_slo_s:
        return f"{p} TTFT {s.ttft_s:.3g} s > SLO {spec.ttft_slo_s:g} s"
    if spec.tpot_slo_s is not None and s.tpot_s is not None and s.tpot_s > spec.tpot_slo_s:
        return f"{p} TPOT {s.tpot_s:.3g} s > SLO {spec.tpot_slo_s:g} s"
    return ""


def _advice(s: PoolSignals, spec: AutoscaleSpec, n: int, need: float, rate: float, cap: float, isl: int, osl: int,
            limited: str, why: str) -> Advice:
    return Advice(n, s.replicas, round(need, 4), rate, cap, isl, osl, spec.usd_per_replica_hour * n, limited, why)


def stabilise(history: Sequence[tuple[float, int]], now: float, window_s: float) -> int:
    """The recommendation to publish: the highest raw recommendation of the last `window_s`
    seconds (history: (time, raw) pairs, the newest included), so it rises at once and falls
    only after the lower need has held for the whole window."""
    recent = [n for t, n in history if t >= now - window_s]
    if not recent:
        raise ValueError("stabilise needs the current recommendation in the history")
    return max(recent)
