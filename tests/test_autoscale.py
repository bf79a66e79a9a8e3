"""Autoscaling advice (planner/autoscale.py, pure) and its replay proof (replay/autoscale.py) on a
scaled-down Azure conversation trace: the pool following the advice meets the SLO with fewer
replica-hours than the fewest fixed replicas that meet it."""

from __future__ import annotations

import math
from decimal import Decimal

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from margin.planner.autoscale import (
    PoolSignals,
    Z,
    capacity_rps,
    headroom_batch,
    make_spec,
    recommend,
    stabilise,
)
from margin.planner.perf import CatalogError, PlannerError, throughput
from margin.replay.autoscale import Comparison, ControlConfig, busiest, compare
from margin.replay.traces import Trace, read_trace
from tests.conftest import SHARED_DATA

SPEC = make_spec("llama-3.1-8b", "l4", ttft_slo_s=2.0, tpot_slo_s=0.1)


@settings(max_examples=200, deadline=None)
@given(st.floats(0.5, 5000), st.sampled_from(sorted(Z)))
def test_headroom_batch_solves_its_equation(b: float, pct: str) -> None:
    z = Z[pct]
    L = headroom_batch(b, z)
    assert 0 < L <= b
    assert math.isclose(L + z * math.sqrt(L), b, rel_tol=1e-9)


def test_headroom_shrinks_with_small_batches() -> None:
    assert headroom_batch(20, Z["p99"]) / 20 == pytest.approx(0.595, abs=0.01)
    assert headroom_batch(200, Z["p99"]) / 200 == pytest.approx(0.844, abs=0.01)
    assert headroom_batch(20, 0.0) == 20


def test_capacity_is_the_planner_rate_with_headroom() -> None:
    r = throughput(SPEC.dep, 1155, 211, ttft_slo=2.0, tpot_slo=0.1)
    cap, ok = capacity_rps(SPEC, 1155, 211)
    assert ok and cap == pytest.approx(headroom_batch(r.batch, Z["p99"]) / r.latency_s)
    assert cap < r.requests_per_s


def _sig(**kw: object) -> PoolSignals:
    base: dict[str, object] = {"window_s": 60.0, "arrivals": 0, "replicas": 2, "mean_input_tokens": 1155.0,
                               "mean_output_tokens": 211.0}
    return PoolSignals(**(base | kw))  # type: ignore[arg-type]


def test_rate_rule_and_cost() -> None:
    cap, _ = capacity_rps(SPEC, 1155, 211)
    a = recommend(_sig(arrivals=round(60 * 2.0)), SPEC)
    assert a.replicas == math.ceil(2.0 / (cap * SPEC.target_utilisation)) and a.limited_by == "rate"
    assert a.need == pytest.approx(2.0 / (cap * 0.9), abs=1e-3)
    assert a.usd_per_hour == Decimal("0.80") * a.replicas  # L4 catalogue price, exact
    assert a.arrival_rps == 2.0 and a.isl == 1155 and a.osl == 211


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2000), st.integers(0, 2000), st.integers(0, 200))
def test_more_load_never_fewer_replicas(a1: int, a2: int, queue: int) -> None:
    lo, hi = sorted((a1, a2))
    r_lo = recommend(_sig(arrivals=lo, waiting=float(queue)), SPEC).replicas
    r_hi = recommend(_sig(arrivals=hi, waiting=float(queue)), SPEC).replicas
    assert r_lo <= r_hi
    assert recommend(_sig(arrivals=hi, waiting=float(queue) + 50), SPEC).replicas >= r_hi


def test_trend_plans_a_cold_start_ahead_only_on_a_significant_rise() -> None:
    flat = recommend(_sig(arrivals=210, trends=((100, 110, 60.0),)), SPEC)  # within Poisson noise
    assert flat.limited_by == "rate"
    rising = recommend(_sig(arrivals=300, trends=((100, 200, 60.0),)), SPEC)
    cap, _ = capacity_rps(SPEC, 1155, 211)
    ahead = 200 / 30 + (100 / 30 / 30) * (15 + SPEC.lead_s)  # recent rate + slope x (half of a half + lead)
    assert rising.limited_by == "trend" and "rising" in rising.why
    assert rising.replicas == math.ceil(ahead / (cap * SPEC.target_utilisation))
    slow = recommend(_sig(arrivals=300, trends=((140, 160, 60.0), (1300, 1600, 300.0))), SPEC)
    assert slow.limited_by == "trend"  # a ramp only the long span can tell from noise


def test_queue_rule_drains_a_backlog() -> None:
    cap, _ = capacity_rps(SPEC, 1155, 211)
    a = recommend(_sig(arrivals=30, waiting=300.0), SPEC)
    assert a.limited_by == "queue" and a.replicas == math.ceil((0.5 + 300 / 60) / cap)


def test_latency_breach_adds_one_unless_replicas_are_starting() -> None:
    quiet = _sig(arrivals=6, replicas=3, tpot_s=0.25, latency_samples=30)
    a = recommend(quiet, SPEC)
    assert (a.replicas, a.limited_by) == (4, "latency") and "TPOT 0.25 s > SLO 0.1 s" in a.why
    assert recommend(_sig(arrivals=6, replicas=3, tpot_s=0.25, latency_samples=30, starting=1), SPEC).replicas < 4
    assert recommend(_sig(arrivals=6, replicas=3, tpot_s=0.25, latency_samples=3), SPEC).replicas < 4  # noise


def test_idle_min_and_max() -> None:
    spec = make_spec("llama-3.1-8b", "l4", ttft_slo_s=2.0, tpot_slo_s=0.1, min_replicas=2, max_replicas=5)
    a = recommend(_sig(arrivals=0), spec)
    assert a.replicas == 2 and a.limited_by in ("idle", "min")
    a = recommend(_sig(arrivals=6000), spec)
    assert a.replicas == 5 and a.limited_by == "max" and "needs" in a.why
    zero = make_spec("llama-3.1-8b", "l4", ttft_slo_s=2.0, tpot_slo_s=0.1, min_replicas=0)
    assert recommend(_sig(arrivals=0, replicas=0), zero).replicas == 0  # scale to zero when idle


def test_engine_counters_reveal_traffic_margin_did_not_send() -> None:
    a = recommend(_sig(arrivals=0, running=3.0, engine_generation_tps=211.0 * 2), SPEC)
    assert a.arrival_rps == pytest.approx(2.0) and a.replicas >= 2


def test_unreachable_slo_is_said() -> None:
    strict = make_spec("llama-3.1-8b", "l4", ttft_slo_s=0.01, tpot_slo_s=0.1)
    a = recommend(_sig(arrivals=60), strict)
    assert a.limited_by == "slo_unreachable" and "more replicas cannot fix latency" in a.why


def test_bad_spec_is_precise() -> None:
    with pytest.raises(CatalogError, match="unknown accelerator 'tpu-v9'"):
        make_spec("llama-3.1-8b", "tpu-v9", ttft_slo_s=1.0, tpot_slo_s=None)
    with pytest.raises(PlannerError, match="SLO percentile 'p42'"):
        make_spec("llama-3.1-8b", "l4", ttft_slo_s=1.0, tpot_slo_s=None, percentile="p42")


def test_stabilise_rises_at_once_and_falls_late() -> None:
    h = [(0.0, 3), (15.0, 6)]
    assert stabilise(h, 15.0, 300) == 6
    h += [(30.0, 2), (200.0, 2)]
    assert stabilise(h, 200.0, 300) == 6
    h.append((320.0, 2))
    assert stabilise(h, 320.0, 300) == 2
    with pytest.raises(ValueError):
        stabilise([], 0.0, 300)


# ---- replay proof -------------------------------------------------------------------------------


def _small_trace() -> Trace:
    """Azure 2023 conversation trace, scaled down: every 3rd request of the whole hour (its real
    timing and its swing over the hour kept, at a third of the rate: 2 to 8 replicas of an L4)."""
    t = read_trace(SHARED_DATA / "traces" / "azure2023_conv.csv")
    return t.take(np.arange(0, len(t), 3))


@pytest.fixture(scope="module")
def proof() -> Comparison:
    return compare(_small_trace(), SPEC, control=ControlConfig(), pct="p99", oracle=False)


def test_autoscaled_replica_count_follows_the_load(proof: Comparison) -> None:
    run = proof.autoscaled
    assert run.result.completed == run.result.requests
    counts = [e["recommended"] for e in run.timeline]
    assert min(counts) < max(counts)  # it scaled both ways
    assert all(e["billed"] >= e["serving"] for e in run.timeline)
    assert run.replica_hours == pytest.approx(run.mean_replicas * run.result.span_s / 3600)


def test_replay_proves_fewer_replica_hours_than_a_peak_sized_pool(proof: Comparison) -> None:
    c, fixed = proof, proof.peak_sized
    assert fixed is not None and c.peak_window[1] - c.peak_window[0] == 600
    assert fixed.slo_met and c.slo_met_autoscaled  # p99 TTFT <= 2 s and p99 TPOT <= 0.1 s, none rejected
    assert c.autoscaled.peak_replicas >= fixed.replicas - 1  # it does reach the peak's size
    assert c.autoscaled.replica_hours < fixed.replica_hours
    saving = c.saving_usd(fixed)
    assert saving is not None and saving > 0
    assert saving == fixed.cost_usd - c.autoscaled.cost_usd  # exact Decimal
    d = c.to_dict()
    assert d["saving_vs_peak_sized_usd"] == format(saving, "f") and d["autoscaled"]["timeline"]
    assert d["oracle"] is None


def test_busiest_window() -> None:
    t = _small_trace()
    peak, t0 = busiest(t, 600)
    assert peak.arrival_s[0] == 0 and peak.arrival_s[-1] < 600 and t0 in set(t.arrival_s.tolist())
    counts = [int(np.sum((t.arrival_s >= x) & (t.arrival_s < x + 600))) for x in range(0, 3000, 60)]
    assert len(peak) >= max(counts)
