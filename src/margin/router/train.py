"""Training and evaluating the learned router.

The router is one binary classifier per candidate model, predicting P(model answers well | prompt)
from TF-IDF features of the prompt (logistic regression; the weights are stacked into one dense
matrix so a decision is one sparse-dense product). The policy on top (``margin.policy.learned``)
picks ``argmax_m p[m] - lam * cost[m]``; ``lam`` is the operating point.

Evaluation protocol (``evaluate``): the training data is split into a fit part and a calibration
part (``calib_frac``, by prompt). The router fitted on the fit part scores the calibration part;
the operating point for a target (e.g. 95% of the strongest model's quality) is the cheapest
``lam`` whose calibration quality reaches it. The router is then refitted on all training data and
measured on the test data at that ``lam``: the test set never chooses anything.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import sparse
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import KFold

from margin.policy.learned import choose
from margin.router import metrics as M
from margin.router.data import RoutingTable

Array = npt.NDArray[np.float64]
ROUTERS = ("tfidf-lr",)
LAMBDA_GRID_REL = np.concatenate([[0.0], np.logspace(-3, 3, 121)])  # times 1 / max mean cost


@dataclass
class TfidfLR:
    """TF-IDF + one logistic regression per model. ``predict`` gives P(success) per model."""

    models: list[str]
    C: float = 1.0
    ngram_range: tuple[int, int] = (1, 2)
    max_features: int = 100_000
    min_df: int = 2
    vectorizer: TfidfVectorizer | None = None
    weights: Array = field(default_factory=lambda: np.zeros((0, 0)))
    bias: Array = field(default_factory=lambda: np.zeros(0))

    def features(self) -> dict[str, Any]:
        return {"kind": "tfidf-lr", "tfidf": {"ngram_range": list(self.ngram_range), "max_features": self.max_features,
                                               "min_df": self.min_df, "sublinear_tf": True},
                "classifier": {"kind": "LogisticRegression", "C": self.C, "per_model": True},
                "vocabulary_size": int(self.weights.shape[0])}

    def fit(self, prompts: Sequence[str], scores: Array) -> TfidfLR:
        self.vectorizer = TfidfVectorizer(ngram_range=self.ngram_range, max_features=self.max_features,
                                          min_df=min(self.min_df, max(1, len(prompts) // 50)), sublinear_tf=True,
                                          dtype=np.float32)
        X = self.vectorizer.fit_transform(prompts)
        m = len(self.models)
        self.weights = np.zeros((X.shape[1], m))
        self.bias = np.zeros(m)
        for j in range(m):
            y = (scores[:, j] >= 0.5).astype(np.int64)
            if y.min() == y.max():  # one class only: a constant
                p = float(np.clip(y.mean(), 1e-3, 1 - 1e-3))
                self.bias[j] = np.log(p / (1 - p))
                continue
            clf = LogisticRegression(C=self.C, max_iter=2000)
            clf.fit(X, y)
            self.weights[:, j] = clf.coef_[0]
            self.bias[j] = clf.intercept_[0]
        return self

    def predict_many(self, prompts: Sequence[str]) -> Array:
        if self.vectorizer is None:
            raise RuntimeError("router is not fitted")
        X: sparse.csr_matrix = self.vectorizer.transform(prompts)
        z = np.asarray(X @ self.weights) + self.bias
        return np.asarray(1.0 / (1.0 + np.exp(-z)), dtype=np.float64)

    def predict(self, prompt: str) -> dict[str, float]:
        p = self.predict_many([prompt])[0]
        return {m: float(p[j]) for j, m in enumerate(self.models)}


def make_router(kind: str, models: list[str]) -> TfidfLR:
    if kind == "tfidf-lr":
        return TfidfLR(models)
    raise ValueError(f"unknown router {kind!r} (one of {', '.join(ROUTERS)})")


def choose_many(P: Array, cost_vec: Array, lam: float) -> npt.NDArray[np.int_]:
    """Vectorised ``policy.learned.choose(lam=...)``: argmax p - lam * cost, ties to the cheaper."""
    util = P - lam * cost_vec[None, :]
    order = np.argsort(cost_vec, kind="stable")  # first max in cost order = cheapest among ties
    return np.asarray(order[np.argmax(util[:, order], axis=1)], dtype=np.int64)


def lambda_grid(cost_vec: Array) -> Array:
    return np.asarray(LAMBDA_GRID_REL / max(float(cost_vec.max()), 1e-12), dtype=np.float64)


def sweep(P: Array, t: RoutingTable, cost_vec: Array, grid: Array) -> list[dict[str, float]]:
    pts = []
    for lam in grid:
        q, c = M.realised(t.scores, t.costs, choose_many(P, cost_vec, float(lam)))
        pts.append({"lambda": float(lam), "quality": q, "mean_cost": c})
    return pts


def pick_operating_point(curve: Sequence[dict[str, float]], target: float) -> dict[str, float]:
    """Cheapest point reaching ``target`` quality (the best-quality point if none does)."""
    ok = [p for p in curve if p["quality"] >= target - 1e-12]
    if ok:
        return min(ok, key=lambda p: (p["mean_cost"], -p["quality"]))
    return max(curve, key=lambda p: (p["quality"], -p["mean_cost"]))


def split_calibration(n: int, frac: float, seed: int) -> tuple[npt.NDArray[np.int_], npt.NDArray[np.int_]]:
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    k = max(1, int(round(n * frac)))
    return np.sort(perm[k:]), np.sort(perm[:k])


def strongest_index(t: RoutingTable, strong: str | None) -> int:
    if strong is not None:
        if strong not in t.models:
            raise ValueError(f"--strong {strong!r} is not one of {t.models}")
        return t.models.index(strong)
    return int(np.argmax(t.scores.mean(axis=0)))


def calibrate(train: RoutingTable, kind: str, strong_j: int, targets: Sequence[float], calib_frac: float,
              seed: int) -> dict[float, dict[str, float]]:
    """Operating point (lambda) per target, chosen on a calibration split of ``train``."""
    fit_ix, cal_ix = split_calibration(len(train), calib_frac, seed)
    fit, cal = train.subset(fit_ix), train.subset(cal_ix)
    r = make_router(kind, train.models).fit(fit.prompts, fit.scores)
    cost_vec = fit.costs.mean(axis=0)
    curve = sweep(r.predict_many(cal.prompts), cal, cost_vec, lambda_grid(cost_vec))
    q_ref = float(cal.scores[:, strong_j].mean())
    return {t: {**pick_operating_point(curve, t * q_ref), "calibration_reference_quality": q_ref} for t in targets}


def decision_latency(router: TfidfLR, prompts: Sequence[str], cost_vec: Array, lam: float, n: int = 1000
                     ) -> dict[str, float]:
    """Wall time of one routing decision (featurise, predict, choose) for one prompt, on this CPU."""
    costs = {m: float(cost_vec[j]) for j, m in enumerate(router.models)}
    for p in prompts[:20]:  # warm-up
        choose(router.predict(p), costs, lam=lam)
    samples = []
    for i in range(n):
        p = prompts[i % len(prompts)]
        t0 = time.perf_counter()
        choose(router.predict(p), costs, lam=lam)
        samples.append(time.perf_counter() - t0)
    return M.percentile_ms(samples)


def evaluate(train: RoutingTable, test: RoutingTable, *, kind: str = "tfidf-lr", strong: str | None = None,
             targets: Sequence[float] = (0.95, 1.0), calib_frac: float = 0.2, seed: int = 0,
             latency_n: int = 0) -> dict[str, Any]:
    """Fit on ``train`` (operating points from its calibration split), measure on ``test``."""
    if train.models != test.models:
        raise ValueError(f"train models {train.models} != test models {test.models}")
    sj = strongest_index(train, strong)
    ops = calibrate(train, kind, sj, targets, calib_frac, seed)
    router = make_router(kind, train.models).fit(train.prompts, train.scores)
    cost_vec = train.costs.mean(axis=0)
    P = router.predict_many(test.prompts)
    per_model = {m: {"quality": float(test.scores[:, j].mean()), "mean_cost": float(test.costs[:, j].mean())}
                 for j, m in enumerate(test.models)}
    oq, oc = M.realised(test.scores, test.costs, M.oracle_choice(test.scores, test.costs))
    curve = sweep(P, test, cost_vec, lambda_grid(cost_vec))
    costs_single = [v["mean_cost"] for v in per_model.values()]
    out: dict[str, Any] = {
        "models": list(test.models), "strongest": test.models[sj], "train_rows": len(train), "test_rows": len(test),
        "per_model": per_model, "oracle": {"quality": oq, "mean_cost": oc},
        "curve": curve,
        "aiq": M.aiq([(p["mean_cost"], p["quality"]) for p in curve], (min(costs_single), max(costs_single))),
    }
    s_cost, s_q = per_model[test.models[sj]]["mean_cost"], per_model[test.models[sj]]["quality"]
    out["oracle"]["cost_ratio"] = s_cost / oc if oc > 0 else None
    for t, op in ops.items():
        tag = f"{round(t * 100)}"
        q, c = M.realised(test.scores, test.costs, choose_many(P, cost_vec, op["lambda"]))
        out[f"cost_ratio_at_{tag}"] = s_cost / c if c > 0 else None
        out[f"quality_at_{tag}"] = q
        out[f"relative_quality_at_{tag}"] = q / s_q if s_q > 0 else None
        out[f"mean_cost_at_{tag}"] = c
        out[f"lambda_at_{tag}"] = op["lambda"]
    if len(test.models) == 2:
        wj = 1 - sj
        score = P[:, sj] - P[:, wj]
        frac, qual = M.two_model_curve(score, test.scores[:, wj], test.scores[:, sj])
        qw, qs = float(test.scores[:, wj].mean()), s_q
        out.update(apgr=M.apgr(frac, qual, qw, qs), cpt50=M.cpt(frac, qual, qw, qs, 0.5),
                   cpt80=M.cpt(frac, qual, qw, qs, 0.8))
        grid = np.linspace(0, 1, 101)
        out["strong_share_curve"] = [{"pct_strong": float(x * 100), "quality": float(y)}
                                     for x, y in zip(grid, np.interp(grid, frac, qual), strict=True)]
        for tag in [f"{round(t * 100)}" for t in targets]:
            ch = choose_many(P, cost_vec, out[f"lambda_at_{tag}"])
            out[f"pct_strong_at_{tag}"] = float((ch == sj).mean() * 100)
    if latency_n:
        out["decision_latency_ms"] = decision_latency(router, test.prompts, cost_vec, ops[targets[0]]["lambda"],
                                                      latency_n)
    return out


def _mean_dicts(items: Sequence[Any]) -> Any:
    first = items[0]
    if isinstance(first, dict):
        return {k: _mean_dicts([d[k] for d in items]) for k in first}
    if isinstance(first, list):
        return [_mean_dicts([lst[i] for lst in items]) for i in range(min(len(lst) for lst in items))]
    if isinstance(first, bool) or not isinstance(first, int | float):
        return first
    vals = [v for v in items if v is not None]
    return float(np.mean(vals)) if vals else None


def cross_validate(table: RoutingTable, *, folds: int = 5, seed: int = 0, latency_n: int = 0,
                   **kw: Any) -> dict[str, Any]:
    """K-fold over unique prompts; every numeric result is the mean over folds (``folds_detail``
    keeps each fold's headline numbers)."""
    uniq = sorted(set(table.prompts))
    where: dict[str, list[int]] = {}
    for i, p in enumerate(table.prompts):
        where.setdefault(p, []).append(i)
    results = []
    kf = KFold(n_splits=folds, shuffle=True, random_state=seed)
    for k, (tr_u, te_u) in enumerate(kf.split(uniq)):
        tr = [i for u in tr_u for i in where[uniq[u]]]
        te = [i for u in te_u for i in where[uniq[u]]]
        results.append(evaluate(table.subset(tr), table.subset(te), seed=seed + k,
                                latency_n=latency_n if k == 0 else 0, **kw))
    lat = results[0].get("decision_latency_ms")
    for r in results:
        r.pop("decision_latency_ms", None)
    out: dict[str, Any] = _mean_dicts(results)
    heads = ("quality_at_95", "cost_ratio_at_95", "quality_at_100", "cost_ratio_at_100", "apgr", "cpt50", "cpt80", "aiq")
    out["folds"] = folds
    out["folds_detail"] = [{h: r.get(h) for h in heads if h in r} for r in results]
    if lat is not None:
        out["decision_latency_ms"] = lat
    return out
