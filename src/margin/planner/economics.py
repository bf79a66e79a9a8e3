"""Cost, capacity and energy of each scenario option; break-even volumes; sensitivity.

Money is Decimal USD (estimates, but never float-rounded along the way). A month is
`days_per_month` days (30 by default) and a year is 12 months, the convention of the issue's worked
example (2M queries/day x 2,000 tokens = 120B tokens/month; $0.002/1K tokens = $2.88M/year).
Self-hosted capacity does not depend on volume, so it is computed once per option and every
volume (break-even scan, plots) is arithmetic on it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from margin.planner.catalog import CatalogError, gpu, model
from margin.planner.perf import Deployment, PlannerError, ThroughputResult, latencies, replica_power_w, throughput
from margin.planner.scenario import ApiIn, HybridIn, PartIn, Scenario, ScenarioError, SelfHostedIn, Workload

MILLION = Decimal(1_000_000)
THOUSAND = Decimal(1000)
HOURS_3Y = Decimal(3 * 365 * 24)
CENT = Decimal("0.01")


def dec(x: float) -> Decimal:
    """A float estimate as Decimal without binary noise (9 significant digits are plenty)."""
    return Decimal(f"{x:.9g}")


@dataclass(frozen=True)
class Rates:
    """USD per million tokens."""

    input: Decimal
    output: Decimal
    cache_read: Decimal
    source: str


def api_rates(o: ApiIn, input_tokens: float) -> Rates:
    if o.price_per_1k_tokens is not None:
        r = o.price_per_1k_tokens * THOUSAND
        return Rates(r, r, r, "blended per 1K tokens (scenario)")
    if o.price_per_million is not None:
        p = o.price_per_million
        return Rates(p.input, p.output, p.input if p.cache_read is None else p.cache_read, "per million (scenario)")
    from margin.pricing import PricingError, genai_rates

    assert o.model is not None
    try:
        mr = genai_rates(o.model)
    except PricingError as e:
        raise ScenarioError(f"option {o.name!r}: {e}") from None
    n = int(input_tokens)
    return Rates(mr.input.at(n), mr.output.at(n), mr.cache_read.at(n), mr.source)


@dataclass(frozen=True)
class Capacity:
    """One self-hosted option's replica, sized once for the workload's token shape."""

    dep: Deployment
    tput: ThroughputResult
    usd_per_gpu_hour: Decimal
    owned_3y_usd: Decimal


def capacity(o: SelfHostedIn, isl: float, osl: float, prefix_hit: float) -> Capacity:
    try:
        dep = Deployment(model(o.model), gpu(o.gpu), o.tp, o.precision, o.kv_precision)
        tr = throughput(dep, max(1, round(isl)), max(1, round(osl)), ttft_slo=o.ttft_slo_s, tpot_slo=o.tpot_slo_s,
                        prefix_hit=prefix_hit, max_batch=o.max_batch)
    except (CatalogError, PlannerError) as e:
        raise ScenarioError(f"option {o.name!r}: {e}") from None
    if not tr.meets_slo:
        raise ScenarioError(f"option {o.name!r}: even one request at a time misses the SLO "
                            f"(TTFT {tr.ttft_s:.3f} s, TPOT {tr.tpot_s:.4f} s)")
    return Capacity(dep, tr, o.usd_per_hour if o.usd_per_hour is not None else dep.gpu.usd_per_hour,
                    o.owned_3y_usd if o.owned_3y_usd is not None else dep.gpu.owned_3y_usd)


@dataclass
class Cost:
    """One option (or hybrid part) at one volume, per month."""

    monthly_usd: Decimal
    requests: float                 # per month, including cache hits
    tokens: float                   # input + output per month, including cache hits
    output_tokens: float
    kwh: float | None
    gpus_peak: int = 0
    replicas_peak: int = 0
    utilisation: float | None = None
    p99_ttft_s: float | None = None
    p99_tpot_s: float | None = None
    rate_source: str = ""
    energy_tokens: float = 0.0          # tokens the kwh covers (hybrids: self-hosted parts only)
    energy_output_tokens: float = 0.0


def _month(w: Workload, days: int) -> tuple[float, float, float, float]:
    """Requests, served requests (not cache hits), input and output tokens per month."""
    req = w.requests_per_day * days
    return req, req * (1 - w.cache_hit_rate), req * w.input_tokens, req * w.output_tokens


def api_cost(o: ApiIn, w: Workload, days: int) -> Cost:
    req, served, tin, tout = _month(w, days)
    r = api_rates(o, w.input_tokens)
    s = dec(served)
    cached = s * dec(w.input_tokens * w.prefix_hit_rate)
    fresh = s * dec(w.input_tokens) - cached
    usd = (fresh * r.input + cached * r.cache_read + s * dec(w.output_tokens) * r.output) / MILLION
    return Cost(usd, req, tin + tout, tout, None, p99_ttft_s=o.ttft_s,
                p99_tpot_s=o.tpot_s, rate_source=r.source)


def _peak_latency(cap: Capacity, w: Workload, per_replica_rps: float, prefix: float) -> tuple[float, float]:
    """p99 TTFT/TPOT estimate at the peak hour: the batch where b / latency(b) meets the per-replica
    arrival rate (Little's law), with the p99 prompt; TTFT adds one TPOT of wait for the running step."""
    tr = cap.tput
    isl, osl = max(1, round(w.input_tokens)), max(1, round(w.output_tokens))
    b = 1
    lo, hi = 1, tr.batch
    while lo <= hi:  # b / latency grows with b up to the SLO batch
        mid = (lo + hi) // 2
        ttft, tpot, _ = latencies(cap.dep, isl, osl, mid, prefix)
        if mid / (ttft + (osl - 1) * tpot) >= per_replica_rps:
            b, hi = mid, mid - 1
        else:
            lo = mid + 1
    isl99 = min(max(1, round(w.input_p99)), cap.dep.model.context - osl)
    ttft99, tpot99, _ = latencies(cap.dep, isl99, osl, b, prefix)
    return ttft99 + tpot99, tpot99


def self_hosted_cost(o: SelfHostedIn, cap: Capacity, w: Workload, days: int, energy_price: Decimal,
                     pue: float) -> Cost:
    req, served, tin, tout = _month(w, days)
    tr = cap.tput
    per_replica = tr.requests_per_s * o.max_utilisation
    hourly_rps = [served / days / 86400 * h for h in w.hourly]
    need = [max(o.min_replicas, math.ceil(r * w.burst / per_replica)) for r in hourly_rps]
    peak = max(need)
    running = need if (o.autoscale and o.billing == "rented") else [peak] * 24
    tp = cap.dep.tp
    gpu_hours = Decimal(sum(running) * tp * days)
    # Energy: each running replica busy in proportion to its load (kernels `busy` of the time at full load).
    wh_day = sum(replica_power_w(cap.dep, tr.busy * min(1.0, r / (n * tr.requests_per_s)) if n else 0.0) * n
                 for r, n in zip(hourly_rps, running, strict=True))
    kwh = wh_day * days / 1000 * pue
    if o.billing == "rented":
        usd = gpu_hours * cap.usd_per_gpu_hour     # the hourly price includes power
    else:
        capex = Decimal(peak * tp) * cap.owned_3y_usd / HOURS_3Y * Decimal(24 * days)
        usd = capex + dec(kwh) * energy_price
    util = sum(hourly_rps) / max(1e-12, sum(n * tr.requests_per_s for n in running))
    ttft99 = tpot99 = None
    if served > 0 and peak > 0:
        ttft99, tpot99 = _peak_latency(cap, w, max(hourly_rps) * w.burst / peak, w.prefix_hit_rate)
    return Cost(usd, req, tin + tout, tout, kwh, peak * tp, peak, util, ttft99, tpot99,
                f"{cap.usd_per_gpu_hour} $/GPU-h" if o.billing == "rented" else f"owned {cap.owned_3y_usd} $/GPU/3y",
                tin + tout, tout)


class Planner:
    """Evaluates every option of a scenario at any volume (capacities computed once)."""

    def __init__(self, sc: Scenario):
        self.sc = sc
        self.by_name: dict[str, ApiIn | SelfHostedIn | HybridIn] = {o.name: o for o in sc.options}
        self._caps: dict[tuple[str, float, float], Capacity] = {}

    def _cap(self, o: SelfHostedIn, w: Workload) -> Capacity:
        key = (o.name, w.input_tokens, w.output_tokens)
        if key not in self._caps:
            self._caps[key] = capacity(o, w.input_tokens, w.output_tokens, w.prefix_hit_rate)
        return self._caps[key]

    def _shares(self, h: HybridIn) -> list[tuple[PartIn, float]]:
        fixed = sum(p.share for p in h.parts if isinstance(p.share, float))
        cheap = self.sc.workload.cheap_share
        out = []
        for p in h.parts:
            s = p.share if isinstance(p.share, float) else cheap if p.share == "cheap" else None
            out.append((p, s))
        rest = 1.0 - fixed - sum(s for p, s in out if p.share == "cheap" and s is not None)
        res = [(p, s if s is not None else rest) for p, s in out]
        total = sum(s for _, s in res)
        if abs(total - 1.0) > 1e-6 or any(s < 0 for _, s in res):
            raise ScenarioError(f"hybrid {h.name!r}: shares must be >= 0 and add up to 1 (got {total:.3f})")
        return res

    def cost(self, name: str, w: Workload) -> Cost:
        o = self.by_name[name]
        days = self.sc.days_per_month
        if isinstance(o, ApiIn):
            return api_cost(o, w, days)
        if isinstance(o, SelfHostedIn):
            return self_hosted_cost(o, self._cap(o, w), w, days, self.sc.energy.usd_per_kwh, self.sc.energy.pue)
        total = Cost(Decimal(0), 0.0, 0.0, 0.0, None)
        for part, share in self._shares(o):
            pw = Workload(**{**w.__dict__, "requests_per_day": w.requests_per_day * share,
                             "input_tokens": part.input_tokens or w.input_tokens,
                             "output_tokens": part.output_tokens or w.output_tokens,
                             "input_p99": part.input_tokens or w.input_p99,
                             "output_p99": part.output_tokens or w.output_p99})
            c = self.cost(part.option, pw) if share > 0 else None
            if c is None:
                continue
            total.monthly_usd += c.monthly_usd
            total.requests += c.requests
            total.tokens += c.tokens
            total.output_tokens += c.output_tokens
            if c.kwh is not None:
                total.kwh = (total.kwh or 0.0) + c.kwh
                total.energy_tokens += c.energy_tokens
                total.energy_output_tokens += c.energy_output_tokens
            total.gpus_peak += c.gpus_peak
            total.replicas_peak += c.replicas_peak
            for f in ("p99_ttft_s", "p99_tpot_s"):
                v = getattr(c, f)
                if v is not None:
                    setattr(total, f, max(v, getattr(total, f) or 0.0))
        total.rate_source = " + ".join(f"{p.option} {s:.0%}" for p, s in self._shares(o))
        return total

    def monthly(self, name: str, requests_per_day: float) -> Decimal:
        return self.cost(name, self.sc.workload.scaled(requests_per_day)).monthly_usd

    def break_even(self, a: str, b: str, points: int = 80) -> list[float]:
        """Volumes (requests/day) in the scenario's range where a and b cost the same (sign changes of
        cost_a - cost_b on a log grid, each refined by bisection)."""
        lo, hi = self.sc.volume_range
        grid = [lo * (hi / lo) ** (i / (points - 1)) for i in range(points)]
        diff = [self.monthly(a, v) - self.monthly(b, v) for v in grid]
        out = []
        for i in range(points - 1):
            if (diff[i] < 0) != (diff[i + 1] < 0) and diff[i] != 0:
                x0, x1 = grid[i], grid[i + 1]
                s0 = diff[i] < 0
                for _ in range(40):
                    mid = math.sqrt(x0 * x1)
                    if ((self.monthly(a, mid) - self.monthly(b, mid)) < 0) == s0:
                        x0 = mid
                    else:
                        x1 = mid
                out.append(x1)
        return out


def _q(x: Decimal) -> str:
    return str(x.quantize(CENT))


def option_row(p: Planner, name: str) -> dict[str, Any]:
    sc, w = p.sc, p.sc.workload
    c = p.cost(name, w)
    o = p.by_name[name]
    tasks = c.requests / w.calls_per_task
    kwh = c.kwh
    row: dict[str, Any] = {
        "option": name, "kind": o.kind,
        "monthly_usd": _q(c.monthly_usd), "yearly_usd": _q(c.monthly_usd * 12),
        "usd_per_1m_tokens": (str((c.monthly_usd * MILLION / dec(c.tokens)).quantize(Decimal("0.0001")))
                              if c.tokens else None),
        "usd_per_request": str((c.monthly_usd / dec(c.requests)).quantize(Decimal("0.000001"))) if c.requests else None,
        "usd_per_task": str((c.monthly_usd / dec(tasks)).quantize(Decimal("0.000001"))) if tasks else None,
        "tokens_per_month": c.tokens, "requests_per_month": c.requests,
        "gpus_peak": c.gpus_peak or None, "replicas_peak": c.replicas_peak or None,
        "utilisation": None if c.utilisation is None else round(c.utilisation, 3),
        "p99_ttft_s": None if c.p99_ttft_s is None else round(c.p99_ttft_s, 4),
        "p99_tpot_s": None if c.p99_tpot_s is None else round(c.p99_tpot_s, 5),
        "kwh_per_month": None if kwh is None else round(kwh, 1),
        "j_per_token": None if kwh is None or not c.energy_tokens else round(kwh * 3.6e6 / c.energy_tokens, 4),
        "j_per_output_token": (None if kwh is None or not c.energy_output_tokens
                               else round(kwh * 3.6e6 / c.energy_output_tokens, 4)),
        "energy_covers": None if kwh is None else (
            "all traffic" if c.energy_tokens >= c.tokens * 0.999999
            else f"self-hosted parts ({c.energy_tokens / c.tokens:.0%} of tokens)"),
        "co2_kg_per_month": None if kwh is None else round(kwh * sc.energy.grid_g_co2_per_kwh / 1000, 1),
        "price": c.rate_source,
        "sensitivity": {f"{k:g}x": _q(p.monthly(name, w.requests_per_day / k)) for k in sc.sensitivity},
        "sensitivity_yearly": {f"{k:g}x": _q(p.monthly(name, w.requests_per_day / k) * 12) for k in sc.sensitivity},
    }
    if isinstance(o, SelfHostedIn):
        t = p._cap(o, w).tput
        row["replica"] = {"gpus": t.gpus, "batch": t.batch, "limited_by": t.limited_by,
                          "requests_per_s": round(t.requests_per_s, 3),
                          "output_tokens_per_s": round(t.output_tokens_per_s, 1), "ttft_s": round(t.ttft_s, 4),
                          "tpot_s": round(t.tpot_s, 5)}
    return row


def plan(sc: Scenario) -> dict[str, Any]:
    """The whole answer for a scenario, JSON-able."""
    p = Planner(sc)
    w = sc.workload
    rows = [option_row(p, o.name) for o in sc.options]
    names = [o.name for o in sc.options]
    be = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            xs = p.break_even(a, b)
            if not xs:
                continue
            # Self-hosted cost is a staircase (whole replicas), so lines can cross several times; the
            # last crossing is the volume beyond which one option stays cheaper.
            v = xs[-1]
            above = a if p.monthly(a, v * 1.01) < p.monthly(b, v * 1.01) else b
            be.append({"a": a, "b": b, "requests_per_day": round(v), "users": round(v / w.requests_per_user_per_day),
                       "monthly_usd": _q(p.monthly(a, v)), "cheaper_above": above, "crossings": len(xs),
                       "first_crossing_requests_per_day": round(xs[0])})
    return {
        "scenario": sc.name, "description": sc.description,
        "workload": {"requests_per_day": w.requests_per_day, "input_tokens": round(w.input_tokens, 1),
                     "output_tokens": round(w.output_tokens, 1), "input_p99": w.input_p99, "output_p99": w.output_p99,
                     "calls_per_task": w.calls_per_task, "peak_factor": round(w.peak_factor, 3),
                     "cache_hit_rate": w.cache_hit_rate, "prefix_hit_rate": w.prefix_hit_rate,
                     "tokens_per_month": w.requests_per_day * sc.days_per_month * (w.input_tokens + w.output_tokens)},
        "conventions": {"days_per_month": sc.days_per_month, "months_per_year": 12,
                        "grid_g_co2_per_kwh": sc.energy.grid_g_co2_per_kwh, "pue": sc.energy.pue,
                        "usd_per_kwh": str(sc.energy.usd_per_kwh)},
        "options": rows, "break_even": be, "notes": list(sc.notes),
    }
