"""The serving simulator against the planner's analytic model, Little's law, and hand-computed
cost; every step is priced by margin.planner.perf.step_time_s."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest

from margin.planner.perf import deployment, kv_capacity_tokens, latencies, prefill_step, step_time_s, throughput
from margin.replay.sim import SimConfig, Simulator, find_replicas
from margin.replay.traces import Trace, read_trace

HERE = Path(__file__).parent / "data" / "traces"


def spaced(n: int, isl: int, osl: int, gap_s: float = 60.0) -> Trace:
    return Trace("spaced", "margin", np.arange(n) * gap_s, np.full(n, isl), np.full(n, osl))


def poisson(n: int, rate: float, seed: int = 0) -> Trace:
    rng = np.random.default_rng(seed)
    t = np.cumsum(rng.exponential(1 / rate, n))
    return Trace("poisson", "margin", t - t[0], rng.integers(100, 3000, n), rng.integers(10, 500, n))


@pytest.mark.parametrize(("model", "gpu", "tp", "isl", "osl"), [
    ("llama-3.1-8b", "h100-sxm", 1, 1000, 200),
    ("llama-3.1-8b", "a100-80gb", 1, 3000, 50),
    ("llama-3.1-70b", "h100-sxm", 4, 512, 128),
])
def test_low_load_matches_the_planner_within_5_percent(model: str, gpu: str, tp: int, isl: int, osl: int) -> None:
    dep = deployment(model, gpu, tp)
    r = Simulator(dep, SimConfig()).run(spaced(10, isl, osl))
    analytic = throughput(dep, isl, osl, max_batch=1)
    assert r.completed == 10 and r.preemptions == 0
    assert r.ttft_s["mean"] == pytest.approx(analytic.ttft_s, rel=0.05)
    assert r.tpot_s["mean"] == pytest.approx(analytic.tpot_s, rel=0.05)
    ttft, tpot, _ = latencies(dep, isl, osl, 1, 0.0, None)
    assert r.ttft_s["p99"] == pytest.approx(ttft, rel=1e-9)  # one prefill step, exactly
    assert r.tpot_s["mean"] == pytest.approx(tpot, rel=0.01)


def test_littles_law_holds_on_the_simulated_queue() -> None:
    r = Simulator(deployment("llama-3.1-8b", "h100-sxm"), SimConfig()).run(poisson(6000, 8.0))
    ll = r.littles_law
    # Poisson arrivals see time averages (PASTA): the mean number in system an arrival finds is L.
    assert ll["mean_in_system_seen_by_arrivals"] == pytest.approx(ll["lambda_w"], rel=0.05)
    assert r.completed == 6000


def test_hand_computed_cost_and_energy() -> None:
    dep = deployment("llama-3.1-8b", "h100-sxm")
    r = Simulator(dep, SimConfig(replicas=2)).run(spaced(3, 1000, 2, gap_s=10.0))
    # each request: one prefill step (first token) and one decode step, alone on a replica
    t_prefill = step_time_s(dep, prefill_step(1000))
    t_decode = step_time_s(dep, prefill_step(0, 0, 1, 1000))
    assert r.span_s == pytest.approx(20.0 + t_prefill + t_decode)
    hours = Decimal(str(round(r.span_s, 3))) / 3600
    assert r.cost_usd == dep.gpu.usd_per_hour * 2 * hours
    assert r.gpu_utilisation == pytest.approx(3 * (t_prefill + t_decode) / (2 * r.span_s))


def test_kv_pressure_preempts_and_still_completes_everything() -> None:
    dep = deployment("llama-3.1-8b", "h100-sxm")
    sim = Simulator(dep, SimConfig(max_seqs=64))
    sim.kv_cap = 20_000  # a small KV cache: 64 sequences of ~1,500 tokens cannot all fit
    tr = poisson(400, 50.0, seed=2)
    r = sim.run(tr)
    assert r.preemptions > 0 and r.completed == 400 and r.rejected == 0
    assert np.all(r.per_request["tpot"] > 0)


def test_prefix_cache_hits_shorten_the_prefill() -> None:
    dep = deployment("llama-3.1-8b", "h100-sxm")
    tr = read_trace(HERE / "tiny_mooncake.jsonl")
    warm = Simulator(dep, SimConfig()).run(tr).per_request["ttft"]
    cold = Simulator(dep, SimConfig(prefix_cache=False)).run(tr).per_request["ttft"]
    assert warm[1] < 0.5 * cold[1]  # blocks 1-3 of the 2nd request were cached by the 1st
    assert warm[0] == pytest.approx(cold[0])


def test_too_long_requests_are_rejected_not_hung() -> None:
    dep = deployment("llama-3.1-8b", "h100-sxm")
    big = kv_capacity_tokens(dep) + 10
    tr = Trace("t", "margin", np.array([0.0, 1.0]), np.array([big, 100]), np.array([10, 10]))
    r = Simulator(dep, SimConfig()).run(tr)
    assert (r.rejected, r.completed) == (1, 1)
    assert not r.meets(10.0, 1.0)


def test_find_replicas_is_the_fewest_meeting_the_slo() -> None:
    dep = deployment("llama-3.1-8b", "h100-sxm")
    tr = poisson(3000, 60.0, seed=4)
    s = find_replicas(tr, dep, SimConfig(), ttft_slo=1.0, tpot_slo=0.05)
    assert s.replicas is not None and s.replicas > 1
    assert s.tried[s.replicas].meets(1.0, 0.05)
    assert not s.tried[s.replicas - 1].meets(1.0, 0.05)


def test_no_replica_count_serves_a_request_longer_than_the_context() -> None:
    dep = deployment("llama-3.1-8b", "h100-sxm")
    tr = Trace("t", "margin", np.array([0.0, 1.0]), np.array([200_000, 100]), np.array([10, 10]))
    s = find_replicas(tr, dep, SimConfig(), ttft_slo=2.0, tpot_slo=0.2)
    assert s.replicas is None and len(s.tried) == 1
