"""The learned cascade verifier: answer checks, the pure escalation rule, the artefact, the cascade's
accounting (both calls paid), cross-fitted calibration, and the CLI on real GSM8K rows."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from margin.cli.router import app
from margin.policy.verify import VerifyError, escalate, verdict
from margin.router import cascade_eval as CE
from margin.router import train as T
from margin.router.answer_check import FEATURES, arithmetic, features, holds
from margin.router.data import STRONG, WEAK, RoutingTable
from margin.router.verifier import AnswerVerifier, VerifierError, load_verifier, save_verifier
from tests.conftest import SHARED_DATA

GSM8K = SHARED_DATA / "routing/routellm/gsm8k_responses.csv"
MMLU = SHARED_DATA / "routing/routellm/mmlu"
needs_data = pytest.mark.skipif(not GSM8K.exists(), reason="RouteLLM GSM8K data not present")


# ---- answer checks ---------------------------------------------------------------------------------

def test_arithmetic_is_evaluated_safely() -> None:
    assert arithmetic("3*60") == 180 and arithmetic("1,200 / 4") == 300 and arithmetic("2 x 5") == 10
    assert arithmetic("$12 * 4") == 48 and arithmetic("-3 + 5") == 2
    for bad in ("__import__('os').getpid()", "9**9**9", "1/0", "abc", "", "(" * 300):
        assert arithmetic(bad) is None, bad
    assert holds("48/2", "24") is True and holds("48/2", "25") is False and holds("x", "1") is None


def test_features_see_broken_arithmetic_and_unused_quantities() -> None:
    q = "Tom has 48 apples and gives away half. Then he buys 7 more. How many apples does he have?"
    good = "He gives away 48/2 = <<48/2=24>>24 apples.\nHe has 24 + 7 = <<24+7=31>>31 apples.\n#### 31"
    bad = "He gives away 48/2 = <<48/2=25>>25 apples.\n#### 25"
    fg, fb = dict(zip(FEATURES, features(q, good), strict=True)), dict(zip(FEATURES, features(q, bad), strict=True))
    assert fg["annotations"] == 2 and fg["annotation_errors"] == 0 and fb["annotation_errors"] == 1
    assert fg["has_final"] == 1 and fg["final_equals_last_result"] == 1 and fg["prompt_numbers_unused"] == 0
    assert fb["prompt_numbers_unused"] == 1  # the 7 was never used
    assert dict(zip(FEATURES, features(q, "I think 31."), strict=True))["has_final"] == 0


# ---- the escalation rule ---------------------------------------------------------------------------

def test_escalate_on_expected_gain() -> None:
    assert escalate(0.2, 0.9, 0.3) and not escalate(0.8, 0.9, 0.3) and not escalate(0.25, 0.75, 0.5)  # gain = thr
    ok, why = verdict(0.9, 0.8, 0.0)
    assert ok and "p(cheap right)=0.90" in why
    ok, why = verdict(0.1, 0.8, 0.0)
    assert not ok and "gain +0.70 > +0.00" in why
    with pytest.raises(VerifyError):
        escalate(1.2, 0.5, 0.0)


# ---- verifier and artefact on a synthetic table ------------------------------------------------------

def _synthetic(n: int = 160) -> RoutingTable:
    """The cheap model is right exactly when its arithmetic holds; the strong one always is."""
    rng = np.random.default_rng(0)
    prompts, answers, ok = [], [], []
    for _ in range(n):
        a, b = int(rng.integers(2, 90)), int(rng.integers(2, 90))
        right = bool(rng.random() < 0.8)
        c = a * b if right else a * b + int(rng.integers(1, 9))
        prompts.append(f"A box holds {a} rows of {b} eggs. How many eggs are in the box?")
        answers.append(f"There are {a}*{b} = <<{a}*{b}={c}>>{c} eggs.\n#### {c}")
        ok.append(float(right))
    scores = np.stack([np.asarray(ok), np.ones(n)], axis=1)
    costs = np.tile([0.001, 0.02], (n, 1))
    return RoutingTable(prompts, [WEAK, STRONG], scores, costs, responses={WEAK: answers, STRONG: [""] * n})


def test_verifier_learns_and_round_trips(tmp_path: Path) -> None:
    t = _synthetic()
    cj, sj = CE.pair(t, STRONG)
    assert (cj, sj) == (0, 1)
    v = CE.fit(t, cj, sj)
    pc, ps = CE.predict(v, t, cj)
    assert pc[t.scores[:, 0] == 1].mean() > pc[t.scores[:, 0] == 0].mean() + 0.2
    for i in range(5):
        assert v.predict(t.prompts[i], t.responses[WEAK][i]) == pytest.approx((pc[i], ps[i]), abs=1e-6)
    out = save_verifier(v, tmp_path / "v", operating_point={"rule": "gain_threshold", "value": 0.5},
                        costs={WEAK: 0.001, STRONG: 0.02}, training=t.summary())
    lv = load_verifier(out)
    assert (lv.cheap, lv.strong) == (WEAK, STRONG)
    wrong = next(i for i in range(len(t)) if t.scores[i, 0] == 0)
    right = next(i for i in range(len(t)) if t.scores[i, 0] == 1)
    assert lv.check(t.prompts[right], t.responses[WEAK][right])[0] is True
    assert lv.check(t.prompts[wrong], t.responses[WEAK][wrong])[0] is False
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["format_version"] = 7
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(VerifierError, match="format_version"):
        load_verifier(out)
    manifest["kind"] = "router"
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(VerifierError, match="not a cascade verifier"):
        load_verifier(out)
    with pytest.raises(VerifierError, match="missing"):
        load_verifier(tmp_path / "nothing")


def test_cascade_pays_both_calls_and_meets_target_on_synthetic_data() -> None:
    t = _synthetic(200)
    esc = np.zeros(len(t), dtype=bool)
    esc[:10] = True
    q, c = CE.outcome(t, 0, 1, esc)
    assert c == pytest.approx(0.001 + 10 / 200 * 0.02)  # the cheap call is paid on every query
    assert q == pytest.approx((t.scores[10:, 0].sum() + 10) / 200)
    res = CE.evaluate(t.subset(np.arange(120)), t.subset(np.arange(120, 200)), strong=STRONG, targets=(0.95,))
    assert res["relative_quality_at_95"] >= 0.9 and res["cost_ratio_at_95"] > 2
    assert res["verifier_auc"] > 0.9 and 0 < res["escalated_at_95"] < 1
    assert res["oracle"]["cost_ratio_at_95"] >= res["cost_ratio_at_95"] - 1e-9


def test_a_table_without_answers_is_refused() -> None:
    t = _synthetic(20)
    t.responses = {}
    with pytest.raises(VerifierError, match="no answers"):
        CE.pair(t, STRONG)
    with pytest.raises(VerifierError, match="all right or all wrong"):
        AnswerVerifier(WEAK, STRONG).fit(["q"] * 4, ["a"] * 4, np.ones(4), np.ones(4))


def test_router_crossfit_calibration_scores_every_training_row() -> None:
    t = _synthetic(100)
    ops = T.calibrate(t, "tfidf-lr", 1, [0.95], 0.2, 0)
    assert ops[0.95]["calibration"] == "crossfit" and ops[0.95]["calibration_rows"] == 100
    assert T.calibrate(t, "tfidf-lr", 1, [0.95], 0.2, 0, "split")[0.95]["calibration_rows"] == 20
    with pytest.raises(ValueError, match="unknown calibration"):
        T.calibrate(t, "tfidf-lr", 1, [0.95], 0.2, 0, "bogus")


# ---- CLI on real GSM8K rows --------------------------------------------------------------------------

def _subset(tmp_path: Path, n: int) -> Path:
    csv.field_size_limit(sys.maxsize)
    with GSM8K.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        rows = [r for _, r in zip(range(n), reader, strict=False)]
        fields = reader.fieldnames
    out = tmp_path / "gsm8k_small.csv"
    with out.open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(fields or []))
        w.writeheader()
        w.writerows(rows)
    return out


@needs_data
def test_cascade_cli_on_real_gsm8k(tmp_path: Path) -> None:
    f = str(_subset(tmp_path, 240))
    runner = CliRunner()
    res = runner.invoke(app, ["cascade-eval", "--format", "routellm", "--train", f, "--folds", "2",
                              "--latency-n", "50", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["cheap"] == WEAK and out["strong"] == STRONG
    for key in ("quality_at_95", "cost_ratio_at_95", "escalated_at_95", "verifier_auc", "aiq", "oracle", "curve",
                "decision_latency_ms"):
        assert key in out, key
    assert 0 <= out["escalated_at_95"] <= 1 and out["mean_cost_at_95"] >= out["per_model"][WEAK]["mean_cost"]
    assert out["verifier_auc"] > 0.55
    res = runner.invoke(app, ["cascade-train", "--format", "routellm", "--train", f, "--out", str(tmp_path / "v")])
    assert res.exit_code == 0, res.output
    v = load_verifier(tmp_path / "v")
    ok, why = v.check("Sam has 3 bags of 4 apples. How many apples?", "3*4 = <<3*4=13>>13\n#### 13")
    assert isinstance(ok, bool) and why.startswith("learned verifier:")
    res = runner.invoke(app, ["eval", "--format", "routellm", "--train", f, "--folds", "2", "--calibration",
                              "bogus"])
    assert res.exit_code in (1, 2) and "calibration" in res.output


@needs_data
def test_cascade_cli_refuses_data_without_answers() -> None:
    res = CliRunner().invoke(app, ["cascade-eval", "--format", "routellm", "--train",
                                   str(MMLU / "mmlu_anatomy.csv"), "--folds", "2"])
    assert res.exit_code in (1, 2) and "no answers" in res.output
