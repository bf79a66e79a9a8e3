"""The planner's performance model: catalogues, hand-checked roofline arithmetic, the calibration
fit, and the analytic throughput against a step-by-step simulation built on the same primitive."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from margin.planner.calibrate import fit, points, predict, table
from margin.planner.catalog import CatalogError, gpu, gpus, model, models
from margin.planner.perf import (
    Deployment,
    PlannerError,
    Step,
    compute_bound_batch,
    deployment,
    fitted,
    kv_bytes_per_token,
    kv_capacity_tokens,
    latencies,
    prefill_step,
    replica_power_w,
    step_time_s,
    throughput,
)

MODELS = ["llama-2-7b", "llama-2-13b", "llama-2-70b", "llama-3.1-8b", "llama-3.1-70b", "llama-3.1-405b",
          "mistral-7b", "mixtral-8x7b", "qwen2.5-7b", "qwen2.5-72b", "gemma-3-270m"]
GPUS = ["h100-sxm", "h200", "b200", "a100-80gb", "l4", "mi300x", "this-cpu"]


def test_catalogues_hold_the_required_entries_with_source_and_date() -> None:
    assert set(MODELS) <= set(models())
    assert set(GPUS) <= set(gpus())
    for m in models().values():
        assert m.source and m.date and m.params > 0 and m.heads % m.kv_heads == 0
    for g in gpus().values():
        assert g.source and g.date and g.flops["bf16"] > 0 and g.hbm_bw > 0 and g.usd_per_hour >= 0
    # MoE: Mixtral uses 2 of 8 experts per token, 12.9B of its 46.7B parameters.
    assert model("mixtral-8x7b").active_params == pytest.approx(12.88e9, rel=0.01)
    assert model("llama-3.1-8b").active_params == model("llama-3.1-8b").params
    with pytest.raises(CatalogError, match=r"unknown model 'llama-9'.*llama-2-70b"):
        model("llama-9")
    with pytest.raises(CatalogError, match="unknown accelerator"):
        gpu("tpu-v9")


def test_this_cpu_is_measured_not_a_datasheet() -> None:
    cpu = gpu("this-cpu")
    assert "measured" in cpu.source
    assert cpu.flops["bf16"] > 1e9 and cpu.hbm_bw > 1e9


def test_kv_bytes_per_token_hand_checked() -> None:
    # 2 (K and V) x 80 layers x 8 KV heads x 128 dims x 2 bytes = 327,680 = 320 KiB
    d70 = Deployment(model("llama-2-70b"), gpu("h100-sxm"), precision="fp16")
    assert kv_bytes_per_token(d70) == 327_680 == 320 * 1024
    # Llama-3-8B: 2 x 32 x 8 x 128 x 2 = 131,072 = 128 KiB; an fp8 KV cache halves it
    d8 = Deployment(model("llama-3.1-8b"), gpu("h100-sxm"))
    assert kv_bytes_per_token(d8) == 128 * 1024
    assert kv_bytes_per_token(replace(d8, kv_precision="fp8")) == 64 * 1024
    # Llama-2-7B has no GQA: 2 x 32 x 32 x 128 x 2 = 512 KiB
    assert kv_bytes_per_token(Deployment(model("llama-2-7b"), gpu("h100-sxm"))) == 512 * 1024


def test_kv_capacity_is_memory_after_weights() -> None:
    d = Deployment(model("llama-3.1-8b"), gpu("h100-sxm"), precision="fp8", kv_precision="fp8")
    free = 80e9 * 0.9 - model("llama-3.1-8b").params * 1.0
    assert kv_capacity_tokens(d) == int(free // 65536)
    two = replace(d, tp=2)
    assert kv_capacity_tokens(two) > 2 * kv_capacity_tokens(d)  # the weights are paid for once


def test_decode_compute_bound_batch_on_h100_bf16_is_about_295() -> None:
    # Decode reads every weight once per step (N x 2 bytes) and does 2 N FLOPs per sequence, so it turns
    # compute-bound at B* = (F / BW) x bytes_per_weight / 2 = 989.5e12 / 3.35e12 = 295.4.
    b = compute_bound_batch(Deployment(model("llama-3.1-70b"), gpu("h100-sxm")))
    assert b == pytest.approx(989.5e12 / 3.35e12) and 290 < b < 300
    # fp8 weights: twice the FLOP/s, half the bytes: the same batch.
    assert compute_bound_batch(Deployment(model("llama-3.1-70b"), gpu("h100-sxm"), precision="fp8")) == pytest.approx(b)


def test_step_time_is_a_roofline() -> None:
    d = deployment("llama-3.1-8b", "h100-sxm")
    one = step_time_s(d, Step(decode_seqs=1, decode_ctx=1000))
    # Memory-bound decode: 16 GB of weights over 3.35 TB/s is 4.8 ms before efficiencies; more
    # sequences cost little until the compute-bound batch.
    assert 0.0048 < one < 0.02
    assert step_time_s(d, Step(decode_seqs=32, decode_ctx=32000)) < 1.5 * one
    # Prefill is compute-bound: 8k tokens x 2 x 8B FLOPs = 128 TFLOP, over 989.5 TFLOP/s = 0.13 s at peak.
    pre = step_time_s(d, prefill_step(8192))
    assert 0.13 < pre < 0.6
    assert step_time_s(d, Step()) == 0.0
    # Tensor parallelism splits the work and adds all-reduces: faster, but not twice as fast.
    d70, d70x4 = deployment("llama-3.1-70b", "h100-sxm", 2, "fp8"), deployment("llama-3.1-70b", "h100-sxm", 4, "fp8")
    s2, s4 = (step_time_s(x, Step(decode_seqs=8, decode_ctx=8000)) for x in (d70, d70x4))
    assert s4 < s2 < 2 * s4
    # MoE at batch 1 streams only the experts one token uses.
    mix = deployment("mixtral-8x7b", "h100-sxm", 2)
    dense = Deployment(replace(model("mixtral-8x7b"), experts=0, expert_params=0,
                               active_params=model("mixtral-8x7b").params), gpu("h100-sxm"), 2)
    assert step_time_s(mix, Step(decode_seqs=1, decode_ctx=500)) < 0.5 * step_time_s(dense, Step(1 * 0, 0, 1, 500))


def test_calibration_every_ratio_within_the_target_band() -> None:
    rows = table()
    assert len([r for r in rows if r["fitted_on"]]) == 18
    for r in rows:
        assert 0.75 <= r["ratio"] <= 1.33, r


def test_shipped_factors_are_the_fit_and_predictions_are_model_outputs() -> None:
    e, rms = fit()
    shipped = fitted()
    for k in ("eta_mem", "eta_compute", "overlap", "step_overhead_s"):
        assert getattr(e, k) == pytest.approx(getattr(shipped, k), rel=0.02, abs=1e-5), k
    assert rms < 0.15
    # Not a lookup: change a factor and every prediction moves.
    p = next(x for x in points() if x.id == "splitwise-h100-tpot-b1")
    assert predict(p, replace(shipped, eta_mem=shipped.eta_mem / 2)) > 1.5 * predict(p, shipped)


def test_throughput_at_batch_one_is_prefill_then_lone_decode_steps() -> None:
    d = deployment("llama-3.1-8b", "h100-sxm", precision="fp8")
    isl, osl = 700, 300
    r = throughput(d, isl, osl, max_batch=1)
    assert r.batch == 1 and r.limited_by == "max_batch"
    assert r.ttft_s == pytest.approx(step_time_s(d, prefill_step(isl)))
    simulated = sum(step_time_s(d, Step(decode_seqs=1, decode_ctx=isl + k)) for k in range(1, osl))
    assert r.tpot_s * (osl - 1) == pytest.approx(simulated, rel=0.01)
    assert r.output_tokens_per_s == pytest.approx(osl / (r.ttft_s + simulated), rel=0.01)


def _closed_loop(dep: Deployment, isl: int, osl: int, b: int) -> float:
    """Output tokens/s of b always-busy slots, stepped one continuous-batching iteration at a time."""
    state = [(i * osl) // b for i in range(b)]  # tokens generated so far; 0 = waiting for its prefill
    t, out = 0.0, 0
    p = prefill_step(isl)
    for _ in range(4 * osl):
        pre = [i for i, s in enumerate(state) if s == 0]
        dec = [i for i, s in enumerate(state) if s > 0]
        t += step_time_s(dep, Step(len(pre) * p.prefill_tokens, len(pre) * p.prefill_attn, len(dec),
                                   sum(isl + state[i] for i in dec)))
        for i in range(b):
            state[i] = 0 if state[i] + 1 >= osl and i in dec else state[i] + 1
        out += b
    return out / t


@pytest.mark.parametrize(("m", "g", "tp", "prec", "isl", "osl"), [
    ("llama-3.1-8b", "h100-sxm", 1, "fp8", 1000, 1000),
    ("llama-3.1-8b", "h100-sxm", 1, "fp8", 128, 128),
    ("llama-3.1-70b", "h100-sxm", 2, "fp8", 5000, 500),
    ("llama-2-70b", "a100-80gb", 2, "bf16", 512, 128),
])
def test_analytic_throughput_matches_a_step_simulation(m: str, g: str, tp: int, prec: str, isl: int, osl: int) -> None:
    d = deployment(m, g, tp, prec)
    for cap in (1, 16, 256):
        r = throughput(d, isl, osl, max_batch=cap)
        assert _closed_loop(d, isl, osl, r.batch) == pytest.approx(r.output_tokens_per_s, rel=0.03)


def test_slos_pick_the_largest_batch_that_meets_them() -> None:
    d = deployment("llama-3.1-8b", "h100-sxm", precision="fp8", kv_precision="fp8")
    free = throughput(d, 1000, 1000)
    tight = throughput(d, 1000, 1000, ttft_slo=0.5, tpot_slo=0.02)
    assert tight.tpot_s <= 0.02 and tight.ttft_s <= 0.5 and tight.limited_by == "tpot_slo"
    assert tight.batch < free.batch and tight.output_tokens_per_s < free.output_tokens_per_s
    looser = throughput(d, 1000, 1000, tpot_slo=0.025)
    assert tight.batch < looser.batch
    # one more sequence would break the SLO
    assert latencies(d, 1000, 1000, tight.batch + 1)[1] > 0.02 >= latencies(d, 1000, 1000, tight.batch)[1]
    impossible = throughput(d, 1000, 1000, tpot_slo=0.0001)
    assert not impossible.meets_slo and impossible.batch == 1 and impossible.limited_by == "slo_unreachable"
    assert free.limited_by == "kv_cache" and free.batch == free.max_batch_kv


def test_prefix_cache_hits_cut_time_to_first_token() -> None:
    d = deployment("llama-3.1-70b", "h100-sxm", 2, "fp8")
    cold = throughput(d, 8000, 200, max_batch=1)
    warm = throughput(d, 8000, 200, max_batch=1, prefix_hit=0.75)
    assert warm.ttft_s < 0.4 * cold.ttft_s


def test_energy_per_token_falls_with_batch() -> None:
    d = deployment("llama-3.1-8b", "h100-sxm")
    j1 = throughput(d, 512, 512, max_batch=1).joules_per_token
    j64 = throughput(d, 512, 512, max_batch=64).joules_per_token
    assert j64 < j1 / 10
    assert replica_power_w(d, 0.0) == gpu("h100-sxm").idle_w
    assert replica_power_w(replace(d, tp=2), 1.0) == 2 * gpu("h100-sxm").tdp_w


def test_impossible_deployments_say_why() -> None:
    with pytest.raises(PlannerError, match=r"llama-3.1-70b in bf16 needs 141.1 GB of weights; 1 x h100-sxm offer 72.0"):
        deployment("llama-3.1-70b", "h100-sxm")
    with pytest.raises(PlannerError, match="--tp 3"):
        deployment("llama-3.1-8b", "h100-sxm", tp=3)
    with pytest.raises(PlannerError, match="no interconnect"):
        deployment("llama-3.1-8b", "this-cpu", tp=2)
    with pytest.raises(PlannerError, match="precision 'fp4'"):
        deployment("llama-3.1-8b", "h100-sxm", precision="fp4")
    with pytest.raises(PlannerError, match="exceeds llama-2-70b's context of 4096"):
        throughput(deployment("llama-2-70b", "h100-sxm", 2, "fp8"), 4000, 500)
    # 405B in fp8 fits on 8 H100; a 121k-token request does not fit beside 70B int4 weights on one
    d405 = deployment("llama-3.1-405b", "h100-sxm", 8, "fp8")
    assert throughput(d405, 1000, 200).batch > 1
    with pytest.raises(PlannerError, match="GB of KV cache"):
        throughput(deployment("llama-3.1-70b", "h100-sxm", 1, "int4"), 120000, 1000)


def test_fp8_without_tensor_support_falls_back_to_bf16_compute() -> None:
    a100 = deployment("llama-3.1-8b", "a100-80gb", precision="fp8")
    assert not a100.gpu.supports("fp8")
    # weight-only fp8 still halves the bytes streamed per decode step
    bf = deployment("llama-3.1-8b", "a100-80gb")
    assert step_time_s(a100, Step(decode_seqs=1, decode_ctx=100)) < step_time_s(bf, Step(decode_seqs=1, decode_ctx=100))
    assert math.isclose(step_time_s(a100, prefill_step(4096)), step_time_s(bf, prefill_step(4096)), rel_tol=0.1)
