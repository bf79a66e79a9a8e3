"""The learned router: metrics on hand-made tables, the pure choice rule, the artefact round trip,
and a small train + eval on real RouteLLM MMLU rows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from margin.cli.router import app
from margin.policy.learned import ChoiceError, choose, choose_op, reason
from margin.router import ArtefactError, load_router, save_router
from margin.router import metrics as M
from margin.router import train as T
from margin.router.data import STRONG, WEAK, RoutingTable, load_routellm
from tests.conftest import SHARED_DATA

MMLU = SHARED_DATA / "routing/routellm/mmlu"
SUBJECTS = ["anatomy", "astronomy", "high_school_biology"]
needs_data = pytest.mark.skipif(not MMLU.exists(), reason="RouteLLM MMLU data not present")


# ---- metrics -----------------------------------------------------------------------------------

def _two_model_table(n: int, f_strong_only: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """weak correct on (1 - f) of queries, strong on all of them."""
    rng = np.random.default_rng(seed)
    yw = (rng.random(n) >= f_strong_only).astype(float)
    return yw, np.ones(n)


def test_apgr_of_a_perfect_router() -> None:
    yw, ys = _two_model_table(1000, 0.2)
    f = 1 - yw.mean()
    frac, q = M.two_model_curve(ys - yw, yw, ys)  # knows exactly where the strong model is needed
    assert q[0] == pytest.approx(yw.mean()) and q[-1] == pytest.approx(1.0)
    assert M.apgr(frac, q, yw.mean(), 1.0) == pytest.approx(1 - f / 2, abs=1e-3)
    assert M.cpt(frac, q, yw.mean(), 1.0, 0.5) == pytest.approx(f / 2, abs=2e-3)
    assert M.cpt(frac, q, yw.mean(), 1.0, 1.0) == pytest.approx(f, abs=2e-3)


def test_random_router_cpt_is_about_x() -> None:
    yw, ys = _two_model_table(20000, 0.3, seed=1)
    score = np.random.default_rng(2).random(len(yw))
    frac, q = M.two_model_curve(score, yw, ys)
    assert M.apgr(frac, q, yw.mean(), 1.0) == pytest.approx(0.5, abs=0.02)
    for x in (0.2, 0.5, 0.8):
        assert M.cpt(frac, q, yw.mean(), 1.0, x) == pytest.approx(x, abs=0.03)


def test_aiq_of_a_single_model_and_of_a_hull() -> None:
    assert M.aiq([(1.0, 0.7)], (1.0, 1.0)) == pytest.approx(0.7)
    assert M.aiq([(1.0, 0.7)], (1.0, 3.0)) == pytest.approx(0.7)  # flat right of the point
    assert M.aiq([(2.0, 0.7)], (1.0, 3.0)) == pytest.approx(0.35)  # zero left of the cheapest point
    # two models: the hull is the segment between them; a point under it adds nothing
    pts = [(0.0, 0.5), (1.0, 0.9), (0.5, 0.6)]
    assert M.hull(pts) == [(0.0, 0.5), (1.0, 0.9)]
    assert M.aiq(pts, (0.0, 1.0)) == pytest.approx(0.7)
    # a dominated, dearer point is dropped (non-decreasing)
    assert M.hull([(0.0, 0.5), (1.0, 0.9), (2.0, 0.8)]) == [(0.0, 0.5), (1.0, 0.9)]


def test_oracle_is_cheapest_correct() -> None:
    scores = np.array([[1, 1, 1], [0, 1, 1], [0, 0, 0]], dtype=float)
    costs = np.array([[1, 2, 3], [1, 2, 3], [1, 2, 3]], dtype=float)
    assert M.oracle_choice(scores, costs).tolist() == [0, 1, 0]
    assert M.realised(scores, costs, M.oracle_choice(scores, costs)) == pytest.approx((2 / 3, 4 / 3))


# ---- choice ------------------------------------------------------------------------------------

P = {"small": 0.6, "mid": 0.8, "big": 0.9}
C = {"small": 0.001, "mid": 0.01, "big": 0.1}


def test_choose_lambda_and_threshold() -> None:
    assert choose(P, C, lam=0.0) == "big"
    assert choose(P, C, lam=1e6) == "small"
    assert choose(P, C, lam=5.0) == "mid"  # 0.8 - 0.05 beats 0.9 - 0.5 and 0.6 - 0.005
    assert choose(P, C, threshold=0.7) == "mid"
    assert choose(P, C, threshold=0.5) == "small"
    assert choose(P, C, threshold=0.95) == "big"  # none reaches it: the most likely
    assert choose({"a": 0.5, "b": 0.5}, {"a": 2.0, "b": 1.0}, lam=0.0) == "b"  # tie: cheaper
    assert choose({**P, "unpriced": 1.0}, C, lam=0.0) == "big"  # no cost, not a candidate
    assert choose_op(P, C, {"rule": "threshold", "value": 0.7}) == "mid"
    with pytest.raises(ChoiceError):
        choose(P, C)
    with pytest.raises(ChoiceError):
        choose(P, C, lam=1.0, threshold=0.5)
    with pytest.raises(ChoiceError):
        choose({}, C, lam=1.0)
    assert reason(P, C, "mid", lam=5.0).startswith("learned: mid p=0.80")


def test_vectorised_choice_matches_policy() -> None:
    rng = np.random.default_rng(3)
    probs, cost = rng.random((200, 4)), rng.random(4) / 100
    names = ["a", "b", "c", "d"]
    for lam in (0.0, 3.0, 30.0, 1e4):
        got = T.choose_many(probs, cost, lam)
        want = [names.index(choose(dict(zip(names, p, strict=True)), dict(zip(names, cost, strict=True)), lam=lam))
                for p in probs]
        assert got.tolist() == want


# ---- artefact ----------------------------------------------------------------------------------

def _toy_table() -> RoutingTable:
    prompts = [f"what is {i} plus {i}" for i in range(40)] + [f"prove theorem {i} about primes" for i in range(40)]
    weak = np.array([1.0] * 40 + [0.0] * 40)
    scores = np.stack([weak, np.ones(80)], axis=1)
    costs = np.tile([0.001, 0.01], (80, 1))
    return RoutingTable(prompts, ["weak", "strong"], scores, costs)


def test_artefact_round_trip_and_version_check(tmp_path: Path) -> None:
    t = _toy_table()
    model = T.make_router("tfidf-lr", t.models).fit(t.prompts, t.scores)
    out = save_router(model, tmp_path / "r", costs={"weak": 0.001, "strong": 0.01},
                      operating_point={"rule": "lambda", "value": 20.0}, training=t.summary(),
                      cost_model={"weak": {"fixed_usd": 0.001, "per_input_token_usd": 0.0},
                                  "strong": {"fixed_usd": 0.01, "per_input_token_usd": 0.0}})
    r = load_router(out)
    assert r.models == ["weak", "strong"] and r.operating_point["value"] == 20.0
    for p in ["what is 3 plus 3", "prove theorem 7 about primes", "unseen words entirely"]:
        assert r.predict(p) == pytest.approx(model.predict(p))
        assert r.predict(p) == pytest.approx(dict(zip(t.models, model.predict_many([p])[0], strict=True)))
    assert r.choose("what is 5 plus 5")[0] == "weak"
    assert r.choose("prove theorem 9 about primes")[0] == "strong"
    manifest = json.loads((out / "manifest.json").read_text())
    assert {"format_version", "created_at", "models", "costs", "features", "operating_point", "training",
            "versions"} <= set(manifest)
    manifest["format_version"] = 999
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtefactError, match="format_version"):
        load_router(out)
    with pytest.raises(ArtefactError):
        load_router(tmp_path / "missing")


# ---- end to end on real data -------------------------------------------------------------------

@needs_data
def test_loader_drops_nothing_it_should_keep() -> None:
    t = load_routellm([MMLU / f"mmlu_{s}.csv" for s in SUBJECTS])
    assert t.models == [WEAK, STRONG] and 300 < len(t) < 1000
    assert set(np.unique(t.scores)) <= {0.0, 1.0}
    assert (t.costs[:, 1] > t.costs[:, 0]).all()


@needs_data
def test_eval_and_train_cli_on_real_mmlu(tmp_path: Path) -> None:
    files = ",".join(str(MMLU / f"mmlu_{s}.csv") for s in SUBJECTS)
    runner = CliRunner()
    res = runner.invoke(app, ["eval", "--format", "routellm", "--train", files, "--folds", "3", "--json",
                              "--calibration", "split", "--png", str(tmp_path)])  # split: fewer fits, faster
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    for key in ("per_model", "oracle", "curve", "aiq", "apgr", "cpt50", "cpt80", "cost_ratio_at_95", "quality_at_95",
                "cost_ratio_at_100", "quality_at_100", "decision_latency_ms"):
        assert key in out, key
    assert 0 <= out["aiq"] <= 1 and 0 <= out["apgr"] <= 1.5 and 0 <= out["cpt50"] <= out["cpt80"] <= 1
    assert 0 < out["quality_at_95"] <= 1 and out["cost_ratio_at_95"] >= 1 - 1e-9
    assert out["decision_latency_ms"]["n"] >= 1000 and out["decision_latency_ms"]["p50"] > 0
    assert out["oracle"]["quality"] >= max(v["quality"] for v in out["per_model"].values())
    assert all(0 <= p["quality"] <= 1 for p in out["curve"])
    assert Path(out["png"]).stat().st_size > 1000

    res = runner.invoke(app, ["train", "--format", "routellm", "--train", files, "--out", str(tmp_path / "art")])
    assert res.exit_code == 0, res.output
    r = load_router(tmp_path / "art")
    assert r.models == [WEAK, STRONG] and r.operating_point["rule"] == "lambda"
    probs = r.predict("Which bone protects the brain?\nA. skull\nB. femur\nC. rib\nD. tibia\nAnswer:")
    assert set(probs) == {WEAK, STRONG} and all(0 < v < 1 for v in probs.values())
    assert choose(probs, r.estimate_costs("x"), lam=r.operating_point["value"]) in (WEAK, STRONG)


def test_oracle_cost_at_target() -> None:
    # weak right on rows 0-1, strong right on all: 75% needs one upgrade, 100% two
    scores = np.array([[1, 1], [1, 1], [0, 1], [0, 1]], dtype=float)
    costs = np.tile([1.0, 10.0], (4, 1))
    assert M.oracle_cost_at(scores, costs, 0.5) == pytest.approx(1.0)
    assert M.oracle_cost_at(scores, costs, 0.75) == pytest.approx((3 * 1 + 10) / 4)
    assert M.oracle_cost_at(scores, costs, 1.0) == pytest.approx((2 + 20) / 4)
    assert M.oracle_cost_at(scores, costs, 1.01) is None
