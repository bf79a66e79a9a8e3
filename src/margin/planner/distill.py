"""Distillation economics (`margin distill plan`): a workflow's teacher, as metered, against a
fine-tuned student served on rented GPUs, priced by the planner at the student's size, quantisation
and accelerator for the workflow's own rate and token shapes.

The teacher side is exact: the ledger's metered spend (Decimal) over the window, scaled to a month.
The student side is the planner's estimate (economics.self_hosted_cost over perf.throughput): the
replicas the workflow's peak hour needs at the SLOs, billed by the GPU-hour. Break-even volume comes
from the planner's scan with the teacher priced at its metered rates per million tokens. The one-off
fine-tuning cost is given, or estimated as LoRA training compute: about 4 x parameters x tokens
FLOPs per epoch (forward 2ND, backward through activations 2ND, frozen weights get no gradient) at a
model FLOP utilisation of 35%, on whole GPU-hours. Pure: the CLI reads the ledger."""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from pydantic import ValidationError

from margin.planner.catalog import PRECISIONS, CatalogError, gpu, model
from margin.planner.economics import MILLION, Planner, capacity, dec
from margin.planner.perf import PlannerError
from margin.planner.scenario import DIURNAL, ApiIn, EnergyIn, PricesIn, Scenario, ScenarioError, SelfHostedIn, Workload

CENT = Decimal("0.01")
TEACHER, STUDENT = "teacher", "student"


class DistillError(ValueError):
    """A plan that cannot be made, with the reason."""


@dataclass(frozen=True)
class Traffic:
    """What the ledger says about the teacher's calls in the workflow over the window."""

    model: str
    calls: int
    days: float                       # the window (the ledger's age if younger)
    spend_usd: Decimal                # metered, exact
    input_tokens: tuple[int, ...]     # per call
    output_tokens: tuple[int, ...]
    cached_input_tokens: int
    input_usd: Decimal                # input + cache read + cache write cost
    output_usd: Decimal
    hourly_calls: tuple[int, ...]     # calls per hour of day (UTC), 24 values


@dataclass(frozen=True)
class Student:
    model: str
    gpu: str
    precision: str = "int4"
    tp: int = 1
    kv_precision: str | None = None
    ttft_slo_s: float | None = 1.0
    tpot_slo_s: float | None = 0.05
    min_replicas: int = 1
    autoscale: bool = False
    max_utilisation: float = 0.85
    usd_per_gpu_hour: Decimal | None = None
    burst: float = 1.0


@dataclass(frozen=True)
class FineTune:
    usd: Decimal | None = None         # a quote; None: estimate
    epochs: float = 3.0
    train_gpu: str = "h100-sxm"
    mfu: float = 0.35


def _pct(values: tuple[int, ...], q: float) -> float:
    s = sorted(values)
    return float(s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))])


def workload(t: Traffic, burst: float) -> Workload:
    n = len(t.input_tokens)
    total_in = sum(t.input_tokens)
    hourly = DIURNAL["flat"]
    if t.days >= 1 and sum(t.hourly_calls) > 0:
        mean = sum(t.hourly_calls) / 24
        hourly = [h / mean for h in t.hourly_calls]
    return Workload(requests_per_day=t.calls / t.days, input_tokens=max(1.0, total_in / n),
                    output_tokens=max(1.0, sum(t.output_tokens) / n), input_p99=max(1.0, _pct(t.input_tokens, 0.99)),
                    output_p99=max(1.0, _pct(t.output_tokens, 0.99)), hourly=tuple(hourly), burst=burst,
                    prefix_hit_rate=min(0.95, t.cached_input_tokens / total_in) if total_in else 0.0)


def teacher_rates(t: Traffic) -> PricesIn:
    """The teacher's metered USD per million tokens (cache discounts blended into the input rate)."""
    tin, tout = sum(t.input_tokens), sum(t.output_tokens)
    rin = t.input_usd * MILLION / tin if tin else Decimal(0)
    rout = t.output_usd * MILLION / tout if tout else Decimal(0)
    return PricesIn(input=rin, output=rout, cache_read=rin)


def fine_tune_cost(ft: FineTune, student_model: str, train_tokens: int) -> dict[str, Any]:
    if ft.usd is not None:
        return {"usd": str(ft.usd.quantize(CENT)), "source": "given (--fine-tune-usd)", "train_tokens": train_tokens}
    try:
        m, g = model(student_model), gpu(ft.train_gpu)
    except CatalogError as e:
        raise DistillError(str(e)) from None
    flops = 4.0 * m.params * train_tokens * ft.epochs
    hours = max(1, math.ceil(flops / (g.peak_flops("bf16") * ft.mfu) / 3600))
    return {"usd": str((g.usd_per_hour * hours).quantize(CENT)),
            "source": f"estimate: LoRA, 4 x {m.params / 1e9:.1f}B params x {train_tokens:,} tokens x {ft.epochs:g} "
                      f"epochs at {ft.mfu:.0%} MFU on {g.id}, {hours} GPU-hour(s) at ${g.usd_per_hour}/h",
            "train_tokens": train_tokens, "gpu_hours": hours}


def _student_option(s: Student, precision: str, name: str = STUDENT) -> SelfHostedIn:
    try:
        return SelfHostedIn.model_validate({
            "kind": "self_hosted", "name": name, "model": s.model, "gpu": s.gpu, "tp": s.tp, "precision": precision,
            "kv_precision": s.kv_precision, "billing": "rented", "autoscale": s.autoscale,
            "min_replicas": s.min_replicas, "max_utilisation": s.max_utilisation, "ttft_slo_s": s.ttft_slo_s,
            "tpot_slo_s": s.tpot_slo_s, "usd_per_hour": s.usd_per_gpu_hour})
    except ValidationError as e:
        raise DistillError("; ".join(f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}"
                                     for err in e.errors())) from None


def _q(x: Decimal) -> str:
    return str(x.quantize(CENT))


def _student_row(p: Planner, w: Workload, name: str) -> dict[str, Any]:
    c = p.cost(name, w)
    o = p.by_name[name]
    assert isinstance(o, SelfHostedIn)
    t = capacity(o, w.input_tokens, w.output_tokens, w.prefix_hit_rate).tput
    return {"monthly_usd": _q(c.monthly_usd), "replicas": c.replicas_peak, "gpus": c.gpus_peak,
            "usd_per_call": (str((c.monthly_usd / dec(c.requests)).quantize(Decimal("0.000001")))
                             if c.requests else None),
            "usd_per_1m_tokens": (str((c.monthly_usd * MILLION / dec(c.tokens)).quantize(Decimal("0.0001")))
                                  if c.tokens else None),
            "utilisation": None if c.utilisation is None else round(c.utilisation, 4),
            "p99_ttft_s": None if c.p99_ttft_s is None else round(c.p99_ttft_s, 4),
            "p99_tpot_s": None if c.p99_tpot_s is None else round(c.p99_tpot_s, 5),
            "replica": {"requests_per_s": round(t.requests_per_s, 3),
                        "output_tokens_per_s": round(t.output_tokens_per_s, 1), "batch": t.batch,
                        "limited_by": t.limited_by, "ttft_s": round(t.ttft_s, 4), "tpot_s": round(t.tpot_s, 5)},
            "price": c.rate_source}


def plan(t: Traffic, s: Student, ft: FineTune, train_tokens: int, days_per_month: int = 30) -> dict[str, Any]:
    """The whole comparison, JSON-able."""
    if t.calls < 1 or t.days <= 0:
        raise DistillError(f"no successful calls of {t.model} to plan from")
    if s.precision not in PRECISIONS:
        raise DistillError(f"--precision {s.precision!r}: choose from {', '.join(PRECISIONS)}")
    w = workload(t, s.burst)
    rpd = w.requests_per_day
    options: list[ApiIn | SelfHostedIn] = [ApiIn(kind="api", name=TEACHER, price_per_million=teacher_rates(t)),
                                           _student_option(s, s.precision)]
    alts = [p for p in PRECISIONS if p not in (s.precision, "fp16")]
    options += [_student_option(s, p, f"{STUDENT} {p}") for p in alts]
    sc = Scenario(f"distill {t.model} -> {s.model}", "", w, tuple(options), EnergyIn(), (), days_per_month,
                  (max(rpd / 1000, 0.01), max(rpd * 10_000, 1000.0)))
    p = Planner(sc)
    try:
        student = _student_row(p, w, STUDENT)
    except (ScenarioError, PlannerError, CatalogError) as e:
        raise DistillError(str(e).replace(f"option {STUDENT!r}: ", "")) from None
    alternatives = []
    for prec in alts:
        try:
            row = _student_row(p, w, f"{STUDENT} {prec}")
            alternatives.append({"precision": prec, "monthly_usd": row["monthly_usd"], "replicas": row["replicas"],
                                 "usd_per_call": row["usd_per_call"], "p99_tpot_s": row["p99_tpot_s"]})
        except (ScenarioError, PlannerError, CatalogError) as e:
            alternatives.append({"precision": prec, "unavailable": str(e).split(": ", 1)[-1]})
    teacher_monthly = t.spend_usd / dec(t.days) * days_per_month
    saving = teacher_monthly - Decimal(student["monthly_usd"])
    fine = fine_tune_cost(ft, s.model, train_tokens)
    be_months = (Decimal(fine["usd"]) / saving) if saving > 0 else None
    crossings = p.break_even(TEACHER, STUDENT)
    cheaper_above = None
    if crossings:
        v = crossings[-1]
        cheaper_above = {"calls_per_day": round(v, 1), "calls_per_month": round(v * days_per_month),
                         "cheaper_above": TEACHER if p.monthly(TEACHER, v * 1.01) < p.monthly(STUDENT, v * 1.01)
                         else STUDENT}
    return {
        "teacher": {"model": t.model, "calls": t.calls, "days": round(t.days, 3), "calls_per_day": round(rpd, 2),
                    "input_tokens_mean": round(w.input_tokens, 1), "output_tokens_mean": round(w.output_tokens, 1),
                    "input_tokens_p99": w.input_p99, "output_tokens_p99": w.output_p99,
                    "metered_usd": str(t.spend_usd), "monthly_usd": _q(teacher_monthly),
                    "usd_per_call": str((t.spend_usd / t.calls).quantize(Decimal("0.000001"))),
                    "rates_per_million": {"input": str(teacher_rates(t).input.quantize(Decimal("0.0001"))),
                                          "output": str(teacher_rates(t).output.quantize(Decimal("0.0001")))}},
        "student": {"model": s.model, "gpu": s.gpu, "tp": s.tp, "precision": s.precision,
                    "ttft_slo_s": s.ttft_slo_s, "tpot_slo_s": s.tpot_slo_s, "min_replicas": s.min_replicas,
                    "autoscale": s.autoscale, **student},
        "alternatives": alternatives,
        "fine_tune": fine,
        "monthly_saving_usd": _q(saving),
        "yearly_saving_usd": _q(saving * 12),
        "break_even_months": None if be_months is None else float(round(be_months, 2)),
        "break_even_volume": cheaper_above,
        "verdict": _verdict(saving, be_months, cheaper_above, rpd),
        "conventions": {"days_per_month": days_per_month,
                        "note": "teacher: metered; student: planner estimate (rented GPUs, peak-hour replicas); "
                                "the saving holds only if the student passes the migration check"},
    }


def _verdict(saving: Decimal, months: Decimal | None, be: dict[str, Any] | None, rpd: float) -> str:
    if saving <= 0:
        where = ""
        if be is not None and be["cheaper_above"] == STUDENT and be["calls_per_day"] > rpd:
            where = f"; the student becomes cheaper above about {be['calls_per_day']:,.0f} calls/day"
        return f"keep the teacher: the student would cost ${-saving:,.2f} more per month at this volume{where}"
    return (f"the student saves ${saving:,.2f} per month and pays back its fine-tuning in {months:.1f} months, "
            "if it passes the migration check")
