"""The semantic-cache verifier: P(the cached entry answers the query), learned from QQP.

A semantic lookup retrieves the query's top-k entries (ANN over MiniLM embeddings); the verifier
scores each (query, entry) pair from `features.candidate_features` and the best-scored entry is
served if its score reaches the threshold. It is trained on exactly that decision: every
retrieved candidate of a training query is a positive only if it is the query's own pair's entry
and the pair is a duplicate - the same counting the evaluation uses (GPTCache's).

Data hygiene: pairs are split with a fixed seed into train / calibration / evaluation, then every
train or calibration pair sharing any text with an evaluation pair (and every train pair sharing
text with a calibration pair) is dropped, so no evaluated question was seen in training or in
choosing the threshold.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from margin.cache_eval.ann import Ids, Sims, build
from margin.cache_eval.embed import Encoder, Matrix
from margin.cache_eval.evaluate import Pair
from margin.cache_eval.features import FEATURES_VERSION, candidate_features, names

DEFAULT_FRACTIONS = (0.7, 0.1, 0.2)  # train, calibration, evaluation


@dataclass(frozen=True, slots=True)
class Split:
    train: list[Pair]
    calibration: list[Pair]
    evaluation: list[Pair]
    dropped_train: int
    dropped_calibration: int

    def summary(self) -> dict[str, int]:
        return {"train": len(self.train), "calibration": len(self.calibration), "evaluation": len(self.evaluation),
                "dropped_train_sharing_text": self.dropped_train,
                "dropped_calibration_sharing_text": self.dropped_calibration}


def pairs_digest(pairs: Sequence[Pair]) -> str:
    h = hashlib.sha256()
    for p in pairs:
        h.update(f"{p.text_a}\x00{p.text_b}\x00{p.label}\x01".encode())
    return h.hexdigest()[:16]


def split_pairs(pairs: Sequence[Pair], seed: int = 0,
                fractions: tuple[float, float, float] = DEFAULT_FRACTIONS) -> Split:
    """Split by pair (fixed seed), then drop train/calibration pairs that share text with later splits."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"split fractions must be three non-negative numbers summing to 1, not {fractions}")
    order = np.random.default_rng(seed).permutation(len(pairs))
    n_train = round(fractions[0] * len(pairs))
    n_cal = round(fractions[1] * len(pairs))
    train = [pairs[int(i)] for i in sorted(order[:n_train])]
    cal = [pairs[int(i)] for i in sorted(order[n_train : n_train + n_cal])]
    ev = [pairs[int(i)] for i in sorted(order[n_train + n_cal :])]
    ev_text = {t for p in ev for t in (p.text_a, p.text_b)}
    cal_kept = [p for p in cal if p.text_a not in ev_text and p.text_b not in ev_text]
    held = ev_text | {t for p in cal_kept for t in (p.text_a, p.text_b)}
    train_kept = [p for p in train if p.text_a not in held and p.text_b not in held]
    return Split(train_kept, cal_kept, ev, len(train) - len(train_kept), len(cal) - len(cal_kept))


@dataclass(slots=True)
class Retrieved:
    """A cache built from pairs' `text_a` and searched with their `text_b`."""

    entry_texts: list[str]
    entries: Matrix
    query_texts: list[str]
    queries: Matrix
    own: npt.NDArray[np.int64]
    labels: npt.NDArray[np.int64]
    idx: Ids
    sims: Sims
    timings_s: dict[str, float]


def retrieve(pairs: Sequence[Pair], encoder: Encoder, k: int, search: str = "hnswlib") -> Retrieved:
    """Embed entries (distinct text_a) and queries, and find each query's top-k entries."""
    import time

    texts: dict[str, int] = {}
    own = np.empty(len(pairs), dtype=np.int64)
    for i, p in enumerate(pairs):
        own[i] = texts.setdefault(p.text_a, len(texts))
    entry_texts = list(texts)
    query_texts = [p.text_b for p in pairs]
    t0 = time.perf_counter()
    entries = encoder.encode(entry_texts)
    t1 = time.perf_counter()
    queries = encoder.encode(query_texts)
    t2 = time.perf_counter()
    idx, sims = build(search, entries).search(queries, k)
    t3 = time.perf_counter()
    return Retrieved(entry_texts, entries, query_texts, queries, own,
                     np.array([p.label for p in pairs], dtype=np.int64), idx, sims,
                     {"embed_entries": t1 - t0, "embed_queries": t2 - t1, "search": t3 - t2})


def chunks(n: int, sizes: Sequence[int], seed: int = 0) -> list[npt.NDArray[np.int64]]:
    """Random disjoint groups of pair indices with sizes cycling through `sizes` (the last group takes
    what is left); one group of all when `sizes` is empty. Each group becomes its own training cache,
    so the verifier sees namespaces as sparse as a small tenant's and as dense as a big one's."""
    order = np.random.default_rng(seed).permutation(n)
    if not sizes:
        return [np.sort(order)]
    out: list[npt.NDArray[np.int64]] = []
    start, i = 0, 0
    while start < n:
        size = int(sizes[i % len(sizes)])
        out.append(np.sort(order[start : start + size]))
        start, i = start + size, i + 1
    return out


def training_rows(r: Retrieved, version: int = FEATURES_VERSION) -> tuple[Matrix, npt.NDArray[np.int64]]:
    """Features of every retrieved (query, candidate) and whether serving it would be a correct hit."""
    x = candidate_features(r.query_texts, r.queries, r.idx, r.sims, r.entry_texts, r.entries, version)
    y = ((r.idx == r.own[:, None]) & (r.labels[:, None] == 1)).reshape(-1).astype(np.int64)
    valid = (r.idx >= 0).reshape(-1)
    return x[valid], y[valid]


def fit(x: Matrix, y: npt.NDArray[np.int64], kind: str = "hgb", seed: int = 0) -> Any:
    """A gradient-boosted tree ensemble (default) or a scaled logistic regression."""
    if kind == "hgb":
        from sklearn.ensemble import HistGradientBoostingClassifier

        model: Any = HistGradientBoostingClassifier(max_iter=400, learning_rate=0.08, max_leaf_nodes=48,
                                                    min_samples_leaf=40, l2_regularization=1.0,
                                                    early_stopping=True, validation_fraction=0.1,
                                                    n_iter_no_change=25, random_state=seed)
    elif kind == "logreg":
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        model = make_pipeline(StandardScaler(), LogisticRegression(C=0.5, max_iter=2000))
    else:
        raise ValueError(f"unknown verifier model {kind!r}; choose hgb or logreg")
    model.fit(x, y)
    return model


class Verifier:
    """A fitted model plus what it was trained with; `score` gives (n, k) probabilities."""

    def __init__(self, model: Any, manifest: dict[str, Any]) -> None:
        self.model, self.manifest = model, manifest

    @property
    def threshold(self) -> float | None:
        t = self.manifest.get("threshold")
        return None if t is None else float(t)

    @property
    def top_k(self) -> int:
        return int(self.manifest.get("top_k", 5))

    @property
    def features_version(self) -> int:
        return int(self.manifest.get("features_version", 1))

    def score(self, q_texts: Sequence[str], qv: Matrix, idx: Ids, sims: Sims, entry_texts: Sequence[str],
              entries: Matrix) -> npt.NDArray[np.float64]:
        n, k = idx.shape
        if n == 0 or len(entries) == 0:
            return np.full((n, k), -1.0)
        x = candidate_features(q_texts, qv, idx, sims, entry_texts, entries, self.features_version)
        p = np.asarray(self.model.predict_proba(x)[:, 1], dtype=np.float64).reshape(n, k)
        return np.where(idx >= 0, p, -1.0)


def decide(scores: npt.NDArray[np.float64], idx: Ids) -> tuple[Ids, npt.NDArray[np.float64]]:
    """Per query: the best-scored candidate and its score (-1 and -1.0 when there is none)."""
    best = np.argmax(scores, axis=1)
    rows = np.arange(len(scores))
    return idx[rows, best], scores[rows, best]


def describe(model: Any, dim: int, version: int = FEATURES_VERSION) -> dict[str, Any]:
    return {"estimator": type(model).__name__, "features": len(names(dim, version)), "features_version": version}
