"""Training and evaluating the learned router.

The router is one binary classifier per candidate model, predicting P(model answers well | prompt)
from TF-IDF features of the prompt (logistic regression; the weights are stacked into one dense
matrix so a decision is one sparse-dense product). The policy on top (``margin.policy.learned``)
picks ``argmax_m p[m] - lam * cost[m]``; ``lam`` is the operating point.

Evaluation protocol (``evaluate``): every training row is scored by a router that did not see it
(5-fold cross-fitting inside the training data; ``calibration="split"`` holds out one
``calib_frac`` share instead). The operating point for a target (e.g. 95% of the strongest model's
quality) is the cheapest ``lam`` whose quality on those out-of-fold scores reaches it. The router
is then refitted on all training data and measured on the test data at that ``lam``: the test set
never chooses anything.
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
from margin.pricing.tokens import count_text
from margin.router import metrics as M
from margin.router.data import RoutingTable

Array = npt.NDArray[np.float64]
ROUTERS = ("tfidf-lr",)
LAMBDA_GRID_REL = np.concatenate([[0.0], np.logspace(-3, 3, 121)])  # times 1 / max mean cost
COST_MODES = ("per_query", "mean")  # decision costs: estimated from the prompt length, or each model's mean


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

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_fast", None)  # the analyzer closure is rebuilt on first use
        return state

    def _fast_path(self) -> tuple[Any, dict[str, int], Array]:
        fast: tuple[Any, dict[str, int], Array] | None = self.__dict__.get("_fast")
        if fast is None:
            if self.vectorizer is None:
                raise RuntimeError("router is not fitted")
            v = self.vectorizer
            fast = (v.build_analyzer(), dict(v.vocabulary_), np.asarray(v.idf_, dtype=np.float64))
            self.__dict__["_fast"] = fast
        return fast

    def predict_vector(self, prompt: str) -> Array:
        """``predict_many([prompt])[0]`` without scikit-learn's per-call overhead (same TF-IDF:
        sublinear tf, smoothed idf, l2 norm)."""
        analyzer, vocab, idf = self._fast_path()
        counts: dict[int, int] = {}
        for tok in analyzer(prompt):
            j = vocab.get(tok)
            if j is not None:
                counts[j] = counts.get(j, 0) + 1
        if not counts:
            z = self.bias
        else:
            idx = np.fromiter(counts.keys(), dtype=np.int64, count=len(counts))
            val = (1.0 + np.log(np.fromiter(counts.values(), dtype=np.float64, count=len(counts)))) * idf[idx]
            val /= np.sqrt(val @ val)
            z = val @ self.weights[idx] + self.bias
        return np.asarray(1.0 / (1.0 + np.exp(-z)), dtype=np.float64)

    def predict(self, prompt: str) -> dict[str, float]:
        p = self.predict_vector(prompt)
        return {m: float(p[j]) for j, m in enumerate(self.models)}


def make_router(kind: str, models: list[str]) -> TfidfLR:
    if kind == "tfidf-lr":
        return TfidfLR(models)
    raise ValueError(f"unknown router {kind!r} (one of {', '.join(ROUTERS)})")


def fit_cost_model(prompts: Sequence[str], costs: Array) -> Array:
    """Per-model cost of a query as ``fixed + per_token * count_text(prompt)`` (least squares,
    clipped at 0): what a query will cost is estimated before the call from its prompt length."""
    n = np.asarray([count_text(p) for p in prompts], dtype=np.float64)
    A = np.stack([np.ones_like(n), n], axis=1)
    coef, *_ = np.linalg.lstsq(A, costs, rcond=None)
    return np.asarray(np.clip(coef, 0.0, None), dtype=np.float64)  # shape (2, models)


def estimate_costs(coef: Array, prompts: Sequence[str]) -> Array:
    n = np.asarray([count_text(p) for p in prompts], dtype=np.float64)
    return np.asarray(np.maximum(coef[0][None, :] + n[:, None] * coef[1][None, :], 1e-12), dtype=np.float64)


def choose_many(P: Array, cost: Array, lam: float) -> npt.NDArray[np.int_]:
    """Vectorised ``policy.learned.choose(lam=...)``: argmax p - lam * cost, ties to the cheaper.
    ``cost`` is per model (m,) or per query and model (n, m)."""
    C = np.broadcast_to(cost, P.shape)
    util = P - lam * C
    best = util.max(axis=1, keepdims=True)
    return np.asarray(np.where(util >= best - 1e-15, C, np.inf).argmin(axis=1), dtype=np.int64)


def lambda_grid(cost_vec: Array) -> Array:
    return np.asarray(LAMBDA_GRID_REL / max(float(cost_vec.max()), 1e-12), dtype=np.float64)


def sweep(P: Array, t: RoutingTable, cost: Array, grid: Array) -> list[dict[str, float]]:
    pts = []
    for lam in grid:
        q, c = M.realised(t.scores, t.costs, choose_many(P, cost, float(lam)))
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
    k = max(1, round(n * frac))
    return np.sort(perm[k:]), np.sort(perm[:k])


def strongest_index(t: RoutingTable, strong: str | None) -> int:
    if strong is not None:
        if strong not in t.models:
            raise ValueError(f"--strong {strong!r} is not one of {t.models}")
        return t.models.index(strong)
    return int(np.argmax(t.scores.mean(axis=0)))


def _decision_costs(mode: str, coef: Array, cost_vec: Array, prompts: Sequence[str]) -> Array:
    return estimate_costs(coef, prompts) if mode == "per_query" else cost_vec


CALIBRATIONS = ("crossfit", "split")
INNER_FOLDS = 5


def calibration_predictions(train: RoutingTable, kind: str, method: str, calib_frac: float, seed: int
                            ) -> tuple[RoutingTable, Array, Array, Array]:
    """Rows to choose the operating point on, each scored by a router that did not train on it,
    plus the mean cost vector and cost model to decide with. ``crossfit``: every training row,
    scored out of fold (``INNER_FOLDS`` folds), so the choice rests on all the data rather than on
    one noisy 20% split; ``split``: a ``calib_frac`` share scored by a router fitted on the rest."""
    if method == "split":
        fit_ix, cal_ix = split_calibration(len(train), calib_frac, seed)
        fit, cal = train.subset(fit_ix), train.subset(cal_ix)
        P = make_router(kind, train.models).fit(fit.prompts, fit.scores).predict_many(cal.prompts)
        return cal, P, fit.costs.mean(axis=0), fit_cost_model(fit.prompts, fit.costs)
    if method != "crossfit":
        raise ValueError(f"unknown calibration {method!r} (one of {', '.join(CALIBRATIONS)})")
    P = np.zeros(train.scores.shape)
    folds = min(INNER_FOLDS, len(train))
    for fit_ix, cal_ix in KFold(n_splits=folds, shuffle=True, random_state=seed).split(np.arange(len(train))):
        fit = train.subset(fit_ix)
        P[cal_ix] = make_router(kind, train.models).fit(fit.prompts, fit.scores).predict_many(
            [train.prompts[i] for i in cal_ix])
    return train, P, train.costs.mean(axis=0), fit_cost_model(train.prompts, train.costs)


def calibrate(train: RoutingTable, kind: str, strong_j: int, targets: Sequence[float], calib_frac: float,
              seed: int, method: str = "crossfit") -> dict[float, dict[str, Any]]:
    """Operating point per target, chosen on calibration predictions of ``train`` (see
    ``calibration_predictions``): the lambda and the decision-cost mode (``per_query``: estimated
    from the prompt length; ``mean``: each model's mean cost) that reach the target most cheaply."""
    cal, P, cost_vec, coef = calibration_predictions(train, kind, method, calib_frac, seed)
    q_ref = float(cal.scores[:, strong_j].mean())
    curves = {mode: sweep(P, cal, _decision_costs(mode, coef, cost_vec, cal.prompts), lambda_grid(cost_vec))
              for mode in COST_MODES}
    out: dict[float, dict[str, Any]] = {}
    for t in targets:
        picks: list[dict[str, Any]] = [{**pick_operating_point(c, t * q_ref), "cost_mode": mode}
                                       for mode, c in curves.items()]
        reach = [p for p in picks if p["quality"] >= t * q_ref - 1e-12]
        best = min(reach, key=lambda p: p["mean_cost"]) if reach else max(picks, key=lambda p: p["quality"])
        out[t] = {**best, "calibration_reference_quality": q_ref, "calibration": method,
                  "calibration_rows": len(cal)}
    return out


def prompt_costs(coef: Array, models: Sequence[str], prompt: str) -> dict[str, float]:
    n = count_text(prompt)
    return {m: max(float(coef[0, j] + n * coef[1, j]), 1e-12) for j, m in enumerate(models)}


def decision_latency(router: TfidfLR, prompts: Sequence[str], cost_coef: Array, lam: float, n: int = 1000
                     ) -> dict[str, float]:
    """Wall time of one routing decision for one prompt on this CPU: featurise, predict, estimate
    the per-model cost from the prompt length, choose."""
    for p in prompts[:20]:  # warm-up
        choose(router.predict(p), prompt_costs(cost_coef, router.models, p), lam=lam)
    samples = []
    for i in range(n):
        p = prompts[i % len(prompts)]
        t0 = time.perf_counter()
        choose(router.predict(p), prompt_costs(cost_coef, router.models, p), lam=lam)
        samples.append(time.perf_counter() - t0)
    return M.percentile_ms(samples)


def evaluate(train: RoutingTable, test: RoutingTable, *, kind: str = "tfidf-lr", strong: str | None = None,
             targets: Sequence[float] = (0.95, 1.0), calib_frac: float = 0.2, seed: int = 0,
             latency_n: int = 0, calibration: str = "crossfit") -> dict[str, Any]:
    """Fit on ``train`` (operating points from its calibration predictions), measure on ``test``."""
    if train.models != test.models:
        raise ValueError(f"train models {train.models} != test models {test.models}")
    sj = strongest_index(train, strong)
    ops = calibrate(train, kind, sj, targets, calib_frac, seed, calibration)
    router = make_router(kind, train.models).fit(train.prompts, train.scores)
    cost_vec = train.costs.mean(axis=0)
    cost_coef = fit_cost_model(train.prompts, train.costs)
    dec = {mode: _decision_costs(mode, cost_coef, cost_vec, test.prompts) for mode in COST_MODES}
    P = router.predict_many(test.prompts)
    per_model = {m: {"quality": float(test.scores[:, j].mean()), "mean_cost": float(test.costs[:, j].mean())}
                 for j, m in enumerate(test.models)}
    oq, oc = M.realised(test.scores, test.costs, M.oracle_choice(test.scores, test.costs))
    curve_mode = ops[targets[0]]["cost_mode"]
    curve = sweep(P, test, dec[curve_mode], lambda_grid(cost_vec))
    costs_single = [v["mean_cost"] for v in per_model.values()]
    out: dict[str, Any] = {
        "models": list(test.models), "strongest": test.models[sj], "train_rows": len(train), "test_rows": len(test),
        "per_model": per_model, "oracle": {"quality": oq, "mean_cost": oc},
        "curve": curve, "curve_cost_mode": curve_mode,
        "aiq": M.aiq([(p["mean_cost"], p["quality"]) for p in curve], (min(costs_single), max(costs_single))),
    }
    s_cost, s_q = per_model[test.models[sj]]["mean_cost"], per_model[test.models[sj]]["quality"]
    out["oracle"]["cost_ratio"] = s_cost / oc if oc > 0 else None
    for t, op in ops.items():
        tag = f"{round(t * 100)}"
        ch = choose_many(P, dec[op["cost_mode"]], op["lambda"])
        q, c = M.realised(test.scores, test.costs, ch)
        out[f"cost_ratio_at_{tag}"] = s_cost / c if c > 0 else None
        out[f"quality_at_{tag}"] = q
        out[f"relative_quality_at_{tag}"] = q / s_q if s_q > 0 else None
        out[f"mean_cost_at_{tag}"] = c
        out[f"lambda_at_{tag}"] = op["lambda"]
        out[f"cost_mode_at_{tag}"] = op["cost_mode"]
        out[f"share_at_{tag}"] = {m: float((ch == j).mean()) for j, m in enumerate(test.models)}
        oracle_c = M.oracle_cost_at(test.scores, test.costs, t * s_q)
        out["oracle"][f"cost_ratio_at_{tag}"] = s_cost / oracle_c if oracle_c else None
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
            out[f"pct_strong_at_{tag}"] = out[f"share_at_{tag}"][test.models[sj]] * 100
        # RouteLLM-style, read off the test curve itself (not an operating point chosen beforehand)
        hit = np.nonzero(qual >= 0.95 * qs - 1e-12)[0]
        out["test_curve_pct_strong_for_95"] = float(frac[hit[0]] * 100) if len(hit) else 100.0
    if latency_n:
        out["decision_latency_ms"] = decision_latency(router, test.prompts, cost_coef, ops[targets[0]]["lambda"],
                                                      latency_n)
    return out


def _mean_dicts(items: Sequence[Any]) -> Any:
    first = items[0]
    if isinstance(first, dict):
        return {k: _mean_dicts([d[k] for d in items]) for k in first}
    if isinstance(first, list):
        return [_mean_dicts([lst[i] for lst in items]) for i in range(min(len(lst) for lst in items))]
    if isinstance(first, bool) or not isinstance(first, int | float | None):
        return first if all(v == first for v in items) else "mixed:" + ",".join(sorted({str(v) for v in items}))
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
    heads = ("quality_at_95", "cost_ratio_at_95", "quality_at_100", "cost_ratio_at_100",
             "apgr", "cpt50", "cpt80", "aiq")
    out["folds"] = folds
    out["folds_detail"] = [{h: r.get(h) for h in heads if h in r} for r in results]
    if lat is not None:
        out["decision_latency_ms"] = lat
    return out
