"""Measuring a learned cascade on routing data that ships the cheap model's answers.

Every query is first sent to the cheap model (its cost is always paid); the verifier reads the
question and the cheap answer, and the query escalates to the strong model when
``p_strong_ok - p_cheap_ok > threshold`` (``margin.policy.verify``). The answer served is the
strong one when escalated, so the cascade's quality is the strong model's score on escalated
queries and the cheap one's elsewhere; its cost is cheap + strong on escalated queries. Both calls
are counted.

Protocol as for the router (``margin.router.train``): the threshold for a target is chosen on
out-of-fold verifier scores of the training rows (5-fold cross-fitting); the verifier is refitted
on all training rows and measured on the test rows at that threshold.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import KFold

from margin.policy.verify import verdict
from margin.router import metrics as M
from margin.router.data import RoutingTable
from margin.router.train import INNER_FOLDS, _mean_dicts, pick_operating_point, strongest_index
from margin.router.verifier import AnswerVerifier, VerifierError

Array = npt.NDArray[np.float64]
THRESHOLDS = np.round(np.linspace(-1.0, 1.0, 401), 6)


def pair(t: RoutingTable, strong: str | None, cheap: str | None = None) -> tuple[int, int]:
    """(cheap, strong) model indices: the cheapest model by mean cost unless named; the strongest
    by training quality unless named. The cheap model's answers must be in the data."""
    sj = strongest_index(t, strong)
    if cheap is not None:
        if cheap not in t.models:
            raise ValueError(f"--cheap {cheap!r} is not one of {t.models}")
        cj = t.models.index(cheap)
    else:
        cj = int(np.argmin(t.costs.mean(axis=0)))
    if cj == sj:
        raise ValueError(f"the cheap and the strong model are both {t.models[cj]!r}")
    if t.models[cj] not in t.responses:
        raise VerifierError(f"the data has no answers from {t.models[cj]!r}: a cascade verifier needs them "
                            "(RouteLLM's gsm8k_responses.csv has them)")
    return cj, sj


def outcome(t: RoutingTable, cj: int, sj: int, esc: npt.NDArray[np.bool_]) -> tuple[float, float]:
    """(quality, mean cost) of the cascade escalating where ``esc``: both calls are paid."""
    q = np.where(esc, t.scores[:, sj], t.scores[:, cj]).mean()
    c = (t.costs[:, cj] + esc * t.costs[:, sj]).mean()
    return float(q), float(c)


def sweep(t: RoutingTable, cj: int, sj: int, pc: Array, ps: Array) -> list[dict[str, float]]:
    gain = ps - pc
    out = []
    for thr in THRESHOLDS:
        esc = gain > thr
        q, c = outcome(t, cj, sj, esc)
        out.append({"threshold": float(thr), "quality": q, "mean_cost": c, "escalated": float(esc.mean())})
    return out


def fit(t: RoutingTable, cj: int, sj: int) -> AnswerVerifier:
    return AnswerVerifier(t.models[cj], t.models[sj]).fit(
        t.prompts, t.responses[t.models[cj]], t.scores[:, cj], t.scores[:, sj])


def predict(v: AnswerVerifier, t: RoutingTable, cj: int) -> tuple[Array, Array]:
    return v.predict_many(t.prompts, t.responses[t.models[cj]])


def calibrate(train: RoutingTable, cj: int, sj: int, targets: Sequence[float], seed: int
              ) -> dict[float, dict[str, Any]]:
    """Threshold per target, chosen on out-of-fold verifier scores of every training row."""
    pc, ps = np.zeros(len(train)), np.zeros(len(train))
    folds = min(INNER_FOLDS, len(train))
    for fit_ix, cal_ix in KFold(n_splits=folds, shuffle=True, random_state=seed).split(np.arange(len(train))):
        v = fit(train.subset(fit_ix), cj, sj)
        pc[cal_ix], ps[cal_ix] = predict(v, train.subset(cal_ix), cj)
    q_ref = float(train.scores[:, sj].mean())
    curve = sweep(train, cj, sj, pc, ps)
    return {t: {**pick_operating_point(curve, t * q_ref), "calibration_reference_quality": q_ref,
                "calibration": "crossfit", "calibration_rows": len(train)} for t in targets}


def oracle_cost_at(t: RoutingTable, cj: int, sj: int, target: float) -> float | None:
    """Least mean cost of a cascade that knows the answers: escalate only queries the cheap model
    gets wrong and the strong one right, cheapest strong call first, until ``target``."""
    gain = t.scores[:, sj] - t.scores[:, cj]
    esc = np.zeros(len(t), dtype=bool)
    q, c = outcome(t, cj, sj, esc)
    if q >= target - 1e-12:
        return c
    for i in np.argsort(np.where(gain > 0, t.costs[:, sj], np.inf), kind="stable")[: int((gain > 0).sum())]:
        esc[i] = True
        q, c = outcome(t, cj, sj, esc)
        if q >= target - 1e-12:
            return c
    return None


def decision_latency(v: AnswerVerifier, t: RoutingTable, cj: int, threshold: float, n: int) -> dict[str, float]:
    """Wall time of one verification on this CPU: featurise question + cheap answer, both
    predictions, the policy. (The cheap call itself is not included.)"""
    answers = t.responses[t.models[cj]]
    for i in range(min(20, len(t))):
        verdict(*v.predict(t.prompts[i], answers[i]), threshold)
    samples = []
    for k in range(n):
        i = k % len(t)
        t0 = time.perf_counter()
        verdict(*v.predict(t.prompts[i], answers[i]), threshold)
        samples.append(time.perf_counter() - t0)
    return M.percentile_ms(samples)


def evaluate(train: RoutingTable, test: RoutingTable, *, strong: str | None = None, cheap: str | None = None,
             targets: Sequence[float] = (0.95, 1.0), seed: int = 0, latency_n: int = 0) -> dict[str, Any]:
    if train.models != test.models:
        raise ValueError(f"train models {train.models} != test models {test.models}")
    cj, sj = pair(train, strong, cheap)
    if test.models[cj] not in test.responses:
        raise VerifierError(f"the test data has no answers from {test.models[cj]!r}")
    ops = calibrate(train, cj, sj, targets, seed)
    v = fit(train, cj, sj)
    pc, ps = predict(v, test, cj)
    per_model = {m: {"quality": float(test.scores[:, j].mean()), "mean_cost": float(test.costs[:, j].mean())}
                 for j, m in enumerate(test.models)}
    s_q, s_cost = per_model[test.models[sj]]["quality"], per_model[test.models[sj]]["mean_cost"]
    curve = sweep(test, cj, sj, pc, ps)
    ok = test.scores[:, cj] >= 0.5
    out: dict[str, Any] = {
        "models": list(test.models), "cheap": test.models[cj], "strong": test.models[sj], "strongest": test.models[sj],
        "train_rows": len(train), "test_rows": len(test), "per_model": per_model, "curve": curve,
        "aiq": M.aiq([(p["mean_cost"], p["quality"]) for p in curve],
                     (per_model[test.models[cj]]["mean_cost"], s_cost)),
        "verifier_auc": float(roc_auc_score(ok, pc)) if 0 < ok.sum() < len(ok) else None,
    }
    oq, oc = outcome(test, cj, sj, (test.scores[:, sj] > test.scores[:, cj]))
    out["oracle"] = {"quality": oq, "mean_cost": oc, "cost_ratio": s_cost / oc}
    for t, op in ops.items():
        tag = f"{round(t * 100)}"
        esc = (ps - pc) > op["threshold"]
        q, c = outcome(test, cj, sj, esc)
        out[f"cost_ratio_at_{tag}"] = s_cost / c if c > 0 else None
        out[f"quality_at_{tag}"] = q
        out[f"relative_quality_at_{tag}"] = q / s_q if s_q > 0 else None
        out[f"mean_cost_at_{tag}"] = c
        out[f"threshold_at_{tag}"] = op["threshold"]
        out[f"escalated_at_{tag}"] = float(esc.mean())
        oc_t = oracle_cost_at(test, cj, sj, t * s_q)
        out["oracle"][f"cost_ratio_at_{tag}"] = s_cost / oc_t if oc_t else None
    if latency_n:
        out["decision_latency_ms"] = decision_latency(v, test, cj, ops[targets[0]]["threshold"], latency_n)
    return out


def cross_validate(table: RoutingTable, *, folds: int = 5, seed: int = 0, latency_n: int = 0,
                   **kw: Any) -> dict[str, Any]:
    """K-fold over unique prompts (the same folds as ``margin.router.train.cross_validate``)."""
    uniq = sorted(set(table.prompts))
    where: dict[str, list[int]] = {}
    for i, p in enumerate(table.prompts):
        where.setdefault(p, []).append(i)
    results = []
    for k, (tr_u, te_u) in enumerate(KFold(n_splits=folds, shuffle=True, random_state=seed).split(uniq)):
        tr = [i for u in tr_u for i in where[uniq[u]]]
        te = [i for u in te_u for i in where[uniq[u]]]
        results.append(evaluate(table.subset(tr), table.subset(te), seed=seed + k,
                                latency_n=latency_n if k == 0 else 0, **kw))
    lat = results[0].pop("decision_latency_ms", None)
    out: dict[str, Any] = _mean_dicts(results)
    heads = ("quality_at_95", "cost_ratio_at_95", "escalated_at_95", "quality_at_100", "cost_ratio_at_100",
             "verifier_auc", "aiq")
    out["folds"] = folds
    out["folds_detail"] = [{h: r.get(h) for h in heads if h in r} for r in results]
    if lat is not None:
        out["decision_latency_ms"] = lat
    return out
