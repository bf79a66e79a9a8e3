"""The scenario file (`margin plan scenario.yaml`): a workload and the serving options to compare.

Parsed with pydantic (precise errors, unknown keys refused) into plain dataclasses that the
economics module evaluates. A trace file named by the workload is read by the CLI (planner/ may not
import replay/), which hands its token samples and arrival times to `workload_from_samples`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from dataclasses import replace as dc_replace
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from margin.planner.catalog import KV_PRECISIONS, PRECISIONS

# Hour-of-day request shapes (mean 1 after normalising); "business": office hours, "consumer": evenings.
DIURNAL = {
    "flat": [1.0] * 24,
    "business": [0.2, 0.15, 0.15, 0.15, 0.2, 0.3, 0.6, 1.0, 1.6, 2.0, 2.1, 2.0,
                 1.8, 2.0, 2.1, 2.0, 1.7, 1.2, 0.8, 0.6, 0.5, 0.4, 0.3, 0.25],
    "consumer": [0.6, 0.4, 0.3, 0.25, 0.25, 0.3, 0.5, 0.7, 0.9, 1.0, 1.1, 1.2,
                 1.3, 1.2, 1.2, 1.2, 1.3, 1.4, 1.6, 1.8, 1.9, 1.7, 1.3, 0.9],
}


class ScenarioError(ValueError):
    """The scenario file is invalid; the message says which field and why."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TokensIn(_Strict):
    mean: float = Field(gt=0)
    p99: float | None = Field(default=None, gt=0)


class WorkloadIn(_Strict):
    requests_per_day: float | None = Field(default=None, gt=0)
    tasks_per_day: float | None = Field(default=None, gt=0)
    calls_per_task: float = Field(default=1.0, ge=1)
    trace: str | None = None
    input_tokens: float | TokensIn | None = None
    output_tokens: float | TokensIn | None = None
    diurnal: Literal["flat", "business", "consumer"] | list[float] = "flat"
    burst: float = Field(default=1.0, ge=1.0)
    cache_hit_rate: float = Field(default=0.0, ge=0, lt=1)
    prefix_hit_rate: float = Field(default=0.0, ge=0, lt=1)
    cheap_share: float = Field(default=0.0, ge=0, le=1)
    requests_per_user_per_day: float = Field(default=20.0, gt=0)

    @model_validator(mode="after")
    def _check(self) -> WorkloadIn:
        if self.requests_per_day is not None and self.tasks_per_day is not None:
            raise ValueError("give requests_per_day or tasks_per_day, not both")
        if self.trace is None:
            if self.requests_per_day is None and self.tasks_per_day is None:
                raise ValueError("give requests_per_day, tasks_per_day or a trace")
            if self.input_tokens is None or self.output_tokens is None:
                raise ValueError("give input_tokens and output_tokens (or a trace)")
        if isinstance(self.diurnal, list) and (len(self.diurnal) != 24 or min(self.diurnal) < 0
                                               or sum(self.diurnal) <= 0):
            raise ValueError("diurnal: 24 non-negative hourly weights (or flat | business | consumer)")
        return self


class PricesIn(_Strict):
    input: Decimal = Field(ge=0)
    output: Decimal = Field(ge=0)
    cache_read: Decimal | None = Field(default=None, ge=0)


class ApiIn(_Strict):
    kind: Literal["api"]
    name: str
    model: str | None = None                         # genai-prices ref, e.g. openai/gpt-4o-mini
    price_per_million: PricesIn | None = None
    price_per_1k_tokens: Decimal | None = Field(default=None, ge=0)   # one blended rate for every token
    ttft_s: float | None = Field(default=None, ge=0)
    tpot_s: float | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _one_price(self) -> ApiIn:
        given = [x for x in (self.model, self.price_per_million, self.price_per_1k_tokens) if x is not None]
        if len(given) != 1:
            raise ValueError(f"option {self.name!r}: give exactly one of model, price_per_million, price_per_1k_tokens")
        return self


class SelfHostedIn(_Strict):
    kind: Literal["self_hosted"]
    name: str
    model: str
    gpu: str
    tp: int = 1
    precision: Literal["bf16", "fp16", "fp8", "int8", "int4"] = "bf16"
    kv_precision: Literal["bf16", "fp16", "fp8", "int8"] | None = None
    billing: Literal["rented", "owned"] = "rented"
    autoscale: bool = False                          # rented only: replicas follow the hourly curve
    min_replicas: int = Field(default=1, ge=0)
    max_utilisation: float = Field(default=0.85, gt=0, le=1)   # headroom for bursts
    ttft_slo_s: float | None = Field(default=None, gt=0)
    tpot_slo_s: float | None = Field(default=None, gt=0)
    max_batch: int | None = Field(default=None, ge=1)
    usd_per_hour: Decimal | None = Field(default=None, ge=0)   # overrides the catalogue, per GPU
    owned_3y_usd: Decimal | None = Field(default=None, ge=0)


class PartIn(_Strict):
    option: str
    share: float | Literal["cheap", "rest"]
    input_tokens: float | None = Field(default=None, gt=0)
    output_tokens: float | None = Field(default=None, gt=0)


class HybridIn(_Strict):
    kind: Literal["hybrid"]
    name: str
    parts: list[PartIn] = Field(min_length=2)


class EnergyIn(_Strict):
    grid_g_co2_per_kwh: float = Field(default=400.0, ge=0)
    pue: float = Field(default=1.2, ge=1)
    usd_per_kwh: Decimal = Field(default=Decimal("0.10"), ge=0)


class ScenarioIn(_Strict):
    name: str
    description: str = ""
    workload: WorkloadIn
    options: list[Annotated[ApiIn | SelfHostedIn | HybridIn, Field(discriminator="kind")]] = Field(min_length=1)
    energy: EnergyIn = EnergyIn()
    sensitivity: list[float] = Field(default=[2.0, 3.0, 5.0])
    days_per_month: int = Field(default=30, ge=28, le=31)   # 30 x 12 months: the worked example
    volume_range: tuple[float, float] | None = None          # requests/day scanned for break-even and plots

    @model_validator(mode="after")
    def _names(self) -> ScenarioIn:
        names = [o.name for o in self.options]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"option names must be unique: {', '.join(sorted(dup))}")
        for o in self.options:
            if isinstance(o, HybridIn):
                for p in o.parts:
                    target = next((x for x in self.options if x.name == p.option), None)
                    if target is None:
                        raise ValueError(f"hybrid {o.name!r}: no option named {p.option!r}")
                    if isinstance(target, HybridIn):
                        raise ValueError(f"hybrid {o.name!r}: part {p.option!r} is itself a hybrid")
        if any(k <= 0 for k in self.sensitivity):
            raise ValueError("sensitivity factors must be > 0")
        return self


@dataclass(frozen=True)
class Workload:
    """What the planner needs to know about the traffic (plain numbers; no file reading here)."""

    requests_per_day: float
    input_tokens: float
    output_tokens: float
    input_p99: float
    output_p99: float
    hourly: tuple[float, ...] = tuple([1.0] * 24)   # mean 1
    burst: float = 1.0                            # busiest minute over the mean rate, within an hour
    calls_per_task: float = 1.0
    cache_hit_rate: float = 0.0                   # requests answered by the response cache (no upstream call)
    prefix_hit_rate: float = 0.0                  # share of input tokens that are a cached prefix
    cheap_share: float = 0.0
    requests_per_user_per_day: float = 20.0

    def scaled(self, requests_per_day: float) -> Workload:
        return dc_replace(self, requests_per_day=requests_per_day)

    @property
    def peak_factor(self) -> float:
        return max(self.hourly) * self.burst


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    workload: Workload
    options: tuple[ApiIn | SelfHostedIn | HybridIn, ...]
    energy: EnergyIn
    sensitivity: tuple[float, ...]
    days_per_month: int
    volume_range: tuple[float, float]
    notes: tuple[str, ...] = field(default_factory=tuple)


def _norm(curve: list[float]) -> tuple[float, ...]:
    m = sum(curve) / len(curve)
    return tuple(v / m for v in curve)


def _tokens(t: float | TokensIn | None) -> tuple[float, float]:
    if t is None:
        raise ScenarioError("token counts missing")
    if isinstance(t, TokensIn):
        return t.mean, t.p99 or t.mean
    return float(t), float(t)


def parse(data: Any) -> ScenarioIn:
    """Validate the YAML document; ScenarioError carries every problem, one per line."""
    try:
        return ScenarioIn.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("function-", "tagged-")))
            lines.append(f"{loc or 'scenario'}: {err['msg']}")
        raise ScenarioError("; ".join(lines)) from None


@dataclass(frozen=True)
class Samples:
    """What a trace contributes: token counts, arrival times (s), and its name."""

    input_tokens: list[int]
    output_tokens: list[int]
    arrival_s: list[float]
    name: str


def _pct(values: list[int], q: float) -> float:
    s = sorted(values)
    return float(s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))])


def build(sc: ScenarioIn, samples: Samples | None = None) -> Scenario:
    """Turn a validated scenario (plus trace samples, if it names a trace) into plain records."""
    w = sc.workload
    notes: list[str] = []
    hourly = _norm(DIURNAL[w.diurnal] if isinstance(w.diurnal, str) else list(w.diurnal))
    burst = w.burst
    if samples is not None:
        if not samples.input_tokens:
            raise ScenarioError(f"trace {samples.name}: no requests")
        isl, osl = (sum(samples.input_tokens) / len(samples.input_tokens),
                    sum(samples.output_tokens) / len(samples.output_tokens))
        isl99, osl99 = _pct(samples.input_tokens, 0.99), _pct(samples.output_tokens, 0.99)
        span = samples.arrival_s[-1] - samples.arrival_s[0] if len(samples.arrival_s) > 1 else 0.0
        rate = (len(samples.arrival_s) - 1) / span if span > 0 else 0.0
        if span >= 120:  # the busiest minute against the trace's mean rate
            per_min: dict[int, int] = {}
            for t in samples.arrival_s:
                k = int((t - samples.arrival_s[0]) // 60)
                per_min[k] = per_min.get(k, 0) + 1
            full = [v for k, v in per_min.items() if (k + 1) * 60 <= span]
            if full:
                burst = max(burst, max(full) / (rate * 60))
        notes.append(f"trace {samples.name}: {len(samples.input_tokens)} requests over {span / 60:.0f} min "
                     f"({rate:.2f} req/s), mean tokens {isl:.0f} in / {osl:.0f} out, busiest minute "
                     f"{burst:.2f}x the mean")
        if w.input_tokens is not None:
            isl, isl99 = _tokens(w.input_tokens)
        if w.output_tokens is not None:
            osl, osl99 = _tokens(w.output_tokens)
        rpd = w.requests_per_day or (w.tasks_per_day * w.calls_per_task if w.tasks_per_day else rate * 86400)
        if rpd <= 0:
            raise ScenarioError(f"trace {samples.name}: cannot derive a request rate; give requests_per_day")
    else:
        isl, isl99 = _tokens(w.input_tokens)
        osl, osl99 = _tokens(w.output_tokens)
        rpd = w.requests_per_day or (w.tasks_per_day or 0) * w.calls_per_task
    wl = Workload(requests_per_day=rpd, input_tokens=isl, output_tokens=osl, input_p99=isl99, output_p99=osl99,
                  hourly=hourly, burst=burst, calls_per_task=w.calls_per_task, cache_hit_rate=w.cache_hit_rate,
                  prefix_hit_rate=w.prefix_hit_rate, cheap_share=w.cheap_share,
                  requests_per_user_per_day=w.requests_per_user_per_day)
    vr = sc.volume_range or (rpd / 1000, rpd * 10)
    if not 0 < vr[0] < vr[1]:
        raise ScenarioError(f"volume_range {list(vr)}: need 0 < low < high")
    for o in sc.options:
        if isinstance(o, SelfHostedIn) and o.autoscale and o.billing == "owned":
            raise ScenarioError(f"option {o.name!r}: owned GPUs cannot autoscale (their cost is sunk); "
                                "use billing: rented")
    return Scenario(sc.name, sc.description, wl, tuple(sc.options), sc.energy, tuple(sc.sensitivity),
                    sc.days_per_month, (float(vr[0]), float(vr[1])), tuple(notes))


__all__ = ["DIURNAL", "KV_PRECISIONS", "PRECISIONS", "ApiIn", "EnergyIn", "HybridIn", "PartIn", "Samples", "Scenario",
           "ScenarioError", "ScenarioIn", "SelfHostedIn", "Workload", "build", "parse"]
