"""Roofline performance model of one serving replica (pure: no I/O besides reading the fitted factors).

One primitive, `step_time_s`, prices one continuous-batching iteration: the bytes it must move
(weights once, KV of every decoding sequence) against HBM bandwidth, the FLOPs it must do (2 x
active params per token, plus attention) against peak compute, each at a fitted efficiency, plus
tensor-parallel all-reduces and a fixed per-step overhead. Everything else (`throughput`, the
scenario planner, the replay simulator) is built from that primitive, so the analytic numbers and
a simulation over the same steps agree by construction. Efficiencies are fitted in calibrate.py
to the measurements in ANCHORS.md section 4; docs/planner.md shows the fit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import cache
from importlib import resources

import yaml

from margin.planner.catalog import KV_PRECISIONS, PRECISIONS, CatalogError, GpuSpec, ModelSpec

# Bytes per weight. int4 carries one fp16 scale and zero per 128-weight group (4.25 bits).
WEIGHT_BYTES = {"bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "int8": 1.0, "int4": 4.25 / 8}
KV_BYTES = {"bf16": 2, "fp16": 2, "fp8": 1, "int8": 1}
# The tensor-core dtype the GEMMs run in: fp8/int8 are W8A8; int4 is weight-only (W4A16).
GEMM_DTYPE = {"bf16": "bf16", "fp16": "bf16", "fp8": "fp8", "int8": "int8", "int4": "bf16"}
ACT_BYTES = 2                 # activations all-reduced in bf16
HBM_USABLE = 0.90             # vLLM's gpu_memory_utilization default: the rest is activations, graphs, fragments
DEFAULT_MAX_BATCH = 2048      # TensorRT-LLM's default max_batch_size
MAX_TP = 8                    # one NVLink domain; more needs pipeline parallelism, which is not modelled


class PlannerError(ValueError):
    """A deployment or workload the model cannot serve, with the reason."""


@dataclass(frozen=True)
class Efficiency:
    """Fitted factors (calibrate.py). eta_*: achieved / peak; overlap: 0 = perfect roofline max, 1 = sum."""

    eta_mem: float = 0.75
    eta_compute: float = 0.5
    overlap: float = 0.3
    step_overhead_s: float = 50e-6
    comm_latency_s: float = 10e-6     # per all-reduce, fixed (not fitted): NCCL/custom all-reduce on NVLink
    eta_comm: float = 0.7             # fixed: NCCL bus bandwidth over link bandwidth


@cache
def fitted() -> Efficiency:
    """The factors fitted to ANCHORS.md section 4 (data/efficiency.yaml, written by calibrate.py)."""
    f = resources.files("margin.planner").joinpath("data", "efficiency.yaml")
    if not f.is_file():
        return Efficiency()
    d = yaml.safe_load(f.read_text(encoding="utf-8")) or {}
    return replace(Efficiency(), **{k: float(v) for k, v in dict(d.get("factors", {})).items()})


@dataclass(frozen=True)
class Deployment:
    """One replica: `tp` accelerators serving one copy of the model."""

    model: ModelSpec
    gpu: GpuSpec
    tp: int = 1
    precision: str = "bf16"
    kv_precision: str | None = None     # None: same as the weights (bf16 for int4 weights)

    @property
    def kv_dtype(self) -> str:
        if self.kv_precision is not None:
            return self.kv_precision
        return self.precision if self.precision in KV_PRECISIONS else "bf16"


@dataclass(frozen=True)
class Step:
    """One continuous-batching iteration on one replica."""

    prefill_tokens: int = 0   # new prompt tokens processed in this iteration (sum over sequences)
    prefill_attn: int = 0     # sum over prefilling sequences of new_tokens * context attended
    decode_seqs: int = 0      # sequences generating one token in this iteration
    decode_ctx: int = 0       # sum of those sequences' context lengths (KV tokens read)


def prefill_step(new_tokens: int, cached: int = 0, decode_seqs: int = 0, decode_ctx: int = 0) -> Step:
    """A step that prefills `new_tokens` after `cached` prefix tokens (each new token attends on average
    to the prefix plus half the new ones, causal), alongside `decode_seqs` decoding sequences."""
    return Step(new_tokens, new_tokens * cached + new_tokens * (new_tokens + 1) // 2, decode_seqs, decode_ctx)


def validate(dep: Deployment) -> None:
    """Raise PlannerError with a precise reason if the deployment cannot run at all."""
    if dep.precision not in PRECISIONS:
        raise PlannerError(f"precision {dep.precision!r}: choose from {', '.join(PRECISIONS)}")
    if dep.kv_dtype not in KV_PRECISIONS:
        raise PlannerError(f"KV precision {dep.kv_dtype!r}: choose from {', '.join(KV_PRECISIONS)}")
    if dep.tp < 1 or dep.tp > MAX_TP or dep.tp & (dep.tp - 1):
        raise PlannerError(f"--tp {dep.tp}: use 1, 2, 4 or 8 (one NVLink domain)")
    if dep.tp > 1 and dep.gpu.interconnect_bw <= 0:
        raise PlannerError(f"{dep.gpu.id} has no interconnect for tensor parallelism: use --tp 1")
    if dep.model.heads % dep.tp:
        raise PlannerError(f"{dep.model.id} has {dep.model.heads} attention heads, not divisible by --tp {dep.tp}")
    usable = dep.tp * dep.gpu.hbm_bytes * HBM_USABLE
    w = weight_bytes(dep)
    if w >= usable:
        raise PlannerError(
            f"{dep.model.id} in {dep.precision} needs {w / 1e9:.1f} GB of weights; {dep.tp} x {dep.gpu.id} "
            f"offer {usable / 1e9:.1f} GB ({HBM_USABLE:.0%} of {dep.tp * dep.gpu.hbm_bytes / 1e9:.0f} GB): "
            "raise --tp or use a smaller precision")


def weight_bytes(dep: Deployment) -> float:
    """Bytes of weights of one replica (all GPUs together)."""
    return dep.model.params * WEIGHT_BYTES[dep.precision]


def kv_bytes_per_token(dep: Deployment) -> int:
    """K and V of every layer for one token, over the whole replica. KV heads are replicated when
    tp exceeds their number (as vLLM does), so tp > kv_heads costs memory."""
    m = dep.model
    return 2 * m.layers * max(m.kv_heads, dep.tp) * m.head_dim * KV_BYTES[dep.kv_dtype]


def kv_capacity_tokens(dep: Deployment) -> int:
    """KV-cache tokens one replica holds after its weights and the usable-memory reserve."""
    free = dep.tp * dep.gpu.hbm_bytes * HBM_USABLE - weight_bytes(dep)
    return max(0, int(free // kv_bytes_per_token(dep)))


def _weight_bytes_read(dep: Deployment, tokens: int) -> float:
    """Weights streamed in one step. MoE: dense part always, each expert if any token routes to it
    (uniform routing: P(expert untouched) = (1 - k/E)^tokens)."""
    m = dep.model
    b = WEIGHT_BYTES[dep.precision]
    # The input embedding is a row lookup, not streamed (unless tied: the output head reads it all).
    streamed = m.params - (0 if m.tied_embeddings else m.embed_params)
    if not m.is_moe:
        return streamed * b
    touched = 1.0 - (1.0 - m.experts_per_token / m.experts) ** tokens
    return ((streamed - m.expert_params) + m.expert_params * touched) * b


def step_parts(dep: Deployment, step: Step, eff: Efficiency | None = None) -> tuple[float, float, float]:
    """(roofline, tensor-parallel comm, fixed overhead) seconds of one iteration."""
    e = eff or fitted()
    m, g, t = dep.model, dep.gpu, dep.tp
    tokens = step.prefill_tokens + step.decode_seqs
    if tokens <= 0:
        return 0.0, 0.0, 0.0
    kvb = kv_bytes_per_token(dep)
    mem_bytes = _weight_bytes_read(dep, tokens) + kvb * (step.decode_ctx + step.prefill_tokens)
    t_mem = mem_bytes / (t * g.hbm_bw * e.eta_mem)
    # 2 FLOPs per weight per token through the layers; the output head (vocab x hidden) only for
    # tokens that are sampled (decode), as engines compute prefill logits for the last token alone.
    body = m.active_params - m.embed_params * (1 if m.tied_embeddings else 2)
    gemm_flops = 2.0 * body * tokens + 2.0 * m.embed_params * step.decode_seqs
    attn_flops = 4.0 * m.layers * m.heads * m.head_dim * (step.prefill_attn + step.decode_ctx)
    t_comp = (gemm_flops / g.peak_flops(GEMM_DTYPE[dep.precision])
              + attn_flops / g.peak_flops("bf16")) / (t * e.eta_compute)
    t_roof = max(t_mem, t_comp) + e.overlap * min(t_mem, t_comp)
    t_comm = 0.0
    if t > 1:  # two all-reduces per layer (attention output, MLP output), ring algorithm
        ring_bytes = 2.0 * (t - 1) / t * tokens * m.hidden * ACT_BYTES
        t_comm = 2 * m.layers * (e.comm_latency_s + ring_bytes / (g.interconnect_bw * e.eta_comm))
    # Launch and scheduling gaps grow with the number of layers (kernels per step), not with the batch.
    return t_roof, t_comm, e.step_overhead_s * m.layers


def step_time_s(dep: Deployment, step: Step, eff: Efficiency | None = None) -> float:
    """Seconds for one iteration: roofline (memory vs compute, partly overlapped) + comm + overhead."""
    return sum(step_parts(dep, step, eff))


def busy_fraction(dep: Deployment, step: Step, eff: Efficiency | None = None) -> float:
    """Share of a step the accelerators run kernels (launch/scheduling gaps draw near-idle power)."""
    roof, comm, over = step_parts(dep, step, eff)
    total = roof + comm + over
    return (roof + comm) / total if total > 0 else 0.0


def replica_power_w(dep: Deployment, utilisation: float) -> float:
    """Average electrical power of one replica whose accelerators run kernels `utilisation` of the time
    (0-1): idle draw plus that share of the headroom to TDP (running kernels is taken at TDP, an upper
    bound: there are no power counters to fit to here)."""
    u = min(1.0, max(0.0, utilisation))
    g = dep.gpu
    return dep.tp * (g.idle_w + (g.tdp_w - g.idle_w) * u)


def compute_bound_batch(dep: Deployment) -> float:
    """Decode batch where weight streaming stops being the bottleneck: 2 N B FLOPs = N b_w bytes x F/BW,
    so B* = (F / BW) x b_w / 2 (H100 bf16: 989.5e12 / 3.35e12 x 2 / 2 = 295)."""
    f = dep.gpu.peak_flops(GEMM_DTYPE[dep.precision])
    return f / dep.gpu.hbm_bw * WEIGHT_BYTES[dep.precision] / 2.0


@dataclass(frozen=True)
class ThroughputResult:
    output_tokens_per_s: float
    input_tokens_per_s: float
    requests_per_s: float
    ttft_s: float
    tpot_s: float
    latency_s: float            # ttft + (osl - 1) x tpot
    batch: int                  # concurrent sequences per replica
    max_batch_kv: int           # sequences the KV cache holds at their mean context isl + osl/2
    limited_by: str             # kv_cache | max_batch | ttft_slo | tpot_slo | slo_unreachable
    meets_slo: bool
    power_w: float              # while serving at this batch (kernels running `busy` of the time)
    busy: float
    joules_per_token: float     # per output token
    kv_capacity_tokens: int
    gpus: int


def latencies(dep: Deployment, isl: int, osl: int, b: int, prefix_hit: float = 0.0,
               eff: Efficiency | None = None) -> tuple[float, float, float]:
    """TTFT, TPOT and the busy fraction of the decode steps with b sequences in flight, from step_parts.

    TTFT: one step that prefills this request beside b-1 decoding ones. TPOT: a decode step of b
    sequences, into which the other b-1 requests' prefills fall, (b-1)/osl per step on average,
    interpolated between whole prefills (n and n+1 per step) so every step priced is a real one.
    At b = 1 this is exactly prefill then osl-1 lone decode steps, as a simulator would see it.
    """
    new = max(1, round(isl * (1.0 - prefix_hit)))
    cached = isl - new
    ctx = isl + (osl + 1) // 2            # mean context while decoding
    first = prefill_step(new, cached, b - 1, (b - 1) * ctx)
    ttft = step_time_s(dep, first, eff)
    if osl <= 1:
        return ttft, 0.0, busy_fraction(dep, first, eff)
    per_step = (b - 1) / (osl - 1)
    n = math.floor(per_step)
    frac = per_step - n
    p = prefill_step(new, cached)
    lo = Step(n * p.prefill_tokens, n * p.prefill_attn, b, b * ctx)
    hi = Step((n + 1) * p.prefill_tokens, (n + 1) * p.prefill_attn, b, b * ctx)
    t_lo, t_hi = step_time_s(dep, lo, eff), step_time_s(dep, hi, eff)
    tpot = (1 - frac) * t_lo + frac * t_hi
    busy = ((1 - frac) * t_lo * busy_fraction(dep, lo, eff) + frac * t_hi * busy_fraction(dep, hi, eff)) / tpot
    return ttft, tpot, busy


def throughput(dep: Deployment, isl: int, osl: int, *, ttft_slo: float | None = None,
               tpot_slo: float | None = None, prefix_hit: float = 0.0, max_batch: int | None = None,
               eff: Efficiency | None = None) -> ThroughputResult:
    """Steady-state throughput of one replica at the largest batch that fits the KV cache and meets
    the SLOs. A paged KV cache holds what sequences use, so in steady state (sequences spread evenly
    over their lives) B sequences need B x (isl + osl/2) tokens; one request's isl + osl must fit."""
    validate(dep)
    if isl < 1 or osl < 1:
        raise PlannerError(f"isl and osl must be >= 1 (got {isl}, {osl})")
    if not 0.0 <= prefix_hit < 1.0:
        raise PlannerError(f"prefix hit rate must be in [0, 1), got {prefix_hit}")
    if isl + osl > dep.model.context:
        raise PlannerError(f"isl + osl = {isl + osl} exceeds {dep.model.id}'s context of {dep.model.context}")
    cap_tokens = kv_capacity_tokens(dep)
    kv_batch = cap_tokens // (isl + (osl + 1) // 2)
    if cap_tokens < isl + osl:
        raise PlannerError(f"one request of {isl + osl} tokens needs {(isl + osl) * kv_bytes_per_token(dep) / 1e9:.2f}"
                           f" GB of KV cache; {dep.tp} x {dep.gpu.id} leave {cap_tokens} tokens")
    cap = min(kv_batch, max_batch or DEFAULT_MAX_BATCH)
    limited = "kv_cache" if kv_batch <= (max_batch or DEFAULT_MAX_BATCH) else "max_batch"

    def ok(b: int) -> tuple[bool, str]:
        ttft, tpot, _ = latencies(dep, isl, osl, b, prefix_hit, eff)
        if ttft_slo is not None and ttft > ttft_slo:
            return False, "ttft_slo"
        if tpot_slo is not None and tpot > tpot_slo:
            return False, "tpot_slo"
        return True, ""

    good, why = ok(1)
    meets = good
    b = 1
    if not good:
        limited = "slo_unreachable"
    elif ok(cap)[0]:
        b = cap
    else:  # latencies grow with the batch: binary search the largest batch that still meets the SLOs
        lo, hi = 1, cap
        why = ok(cap)[1]
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if ok(mid)[0]:
                lo = mid
            else:
                hi = mid
        b, limited = lo, why
    ttft, tpot, busy = latencies(dep, isl, osl, b, prefix_hit, eff)
    latency = ttft + (osl - 1) * tpot
    rps = b / latency
    power = replica_power_w(dep, busy)
    out_tps = rps * osl
    return ThroughputResult(
        output_tokens_per_s=out_tps, input_tokens_per_s=rps * isl, requests_per_s=rps, ttft_s=ttft,
        tpot_s=tpot, latency_s=latency, batch=b, max_batch_kv=kv_batch, limited_by=limited, meets_slo=meets,
        power_w=power, busy=busy, joules_per_token=power / out_tps, kv_capacity_tokens=cap_tokens, gpus=dep.tp)


def deployment(model_id: str, gpu_id: str, tp: int = 1, precision: str = "bf16",
               kv_precision: str | None = None) -> Deployment:
    """Build and validate a deployment from catalogue ids (CatalogError / PlannerError on bad input)."""
    from margin.planner.catalog import gpu, model

    dep = Deployment(model(model_id), gpu(gpu_id), tp, precision, kv_precision)
    validate(dep)
    return dep


__all__ = ["CatalogError", "Deployment", "Efficiency", "PlannerError", "Step", "ThroughputResult",
           "compute_bound_batch", "deployment", "kv_bytes_per_token", "kv_capacity_tokens", "latencies", "prefill_step",
           "replica_power_w", "step_parts", "step_time_s", "throughput", "validate"]
