"""Evaluate a semantic cache's serve decision (top-k retrieval, then cosine or the verifier) with
GPTCache's counting, and train + calibrate a verifier (`margin cache train-verifier`)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from margin.cache_eval.ann import Exact
from margin.cache_eval.artefact import save_verifier
from margin.cache_eval.clusters import cluster_sweep
from margin.cache_eval.embed import Encoder
from margin.cache_eval.evaluate import EvalResult, Pair, choose_threshold, gptcache_comparison, sample_pairs, sweep
from margin.cache_eval.features import FEATURES_VERSION
from margin.cache_eval.verifier import (
    DEFAULT_FRACTIONS,
    Retrieved,
    Verifier,
    chunks,
    decide,
    describe,
    fit,
    pairs_digest,
    retrieve,
    split_pairs,
    training_rows,
)

# Verifier scores are probabilities: coarse steps below 0.95, fine ones where precision is decided.
VERIFIER_THRESHOLDS: tuple[float, ...] = tuple(
    [round(0.05 + 0.01 * i, 4) for i in range(91)] + [round(0.955 + 0.005 * i, 4) for i in range(9)])
SEARCH_LABEL = {"exact": "exact (numpy dot product)", "usearch": "usearch HNSW (M 16, ef 64)",
                "hnswlib": "hnswlib HNSW (M 16, ef 64)", "faiss": "faiss IndexHNSWFlat (M 16, ef 64)"}
Log = Callable[[str], None]
CALIBRATION_Z = 1.645  # one-sided 95%


def evaluate_retrieved(r: Retrieved, thresholds: Sequence[float], target_precision: float, model_name: str,
                       search: str, verifier: Verifier | None = None,
                       clusters: dict[str, int] | None = None) -> EvalResult:
    """Sweep thresholds on the best candidate's score: its cosine, or the verifier's probability.
    With `clusters` (clusters.duplicate_clusters of the whole file) the JSON also gets the count by
    duplicate cluster (`by_duplicate_cluster`), beside GPTCache's."""
    t0 = time.perf_counter()
    if verifier is None:
        best_idx, best_score = r.idx[:, 0], r.sims[:, 0]
    else:
        scores = verifier.score(r.query_texts, r.queries, r.idx, r.sims, r.entry_texts, r.entries)
        best_idx, s = decide(scores, r.idx)
        best_score = s.astype(np.float32)
    t1 = time.perf_counter()
    rows = sweep(best_idx, best_score, r.own, r.labels, thresholds)
    n = len(r.query_texts)
    query_s = r.timings_s["embed_queries"] + r.timings_s["search"] + (t1 - t0)
    extra: dict[str, Any] = {"top_k": int(r.idx.shape[1])}
    if verifier is not None:
        extra["verifier"] = {k: verifier.manifest.get(k) for k in ("path", "estimator", "threshold",
                                                                     "target_precision", "created_at")}
    if clusters is not None:
        crow, answerable = cluster_sweep(best_idx, best_score, r.query_texts, r.entry_texts, clusters, thresholds)
        extra["by_duplicate_cluster"] = {
            "counting": "a hit is correct if the entry served is in the query's duplicate cluster (label-1 pairs "
                        "of the whole file, transitively); recall over queries whose cluster has an entry",
            "answerable": answerable,
            "gptcache_comparison": gptcache_comparison(crow), "sweep": [asdict(x) for x in crow]}
    return EvalResult(
        sweep=rows, chosen=choose_threshold(rows, target_precision), target_precision=target_precision,
        model=model_name, pairs=n, duplicates=int((r.labels == 1).sum()), entries=len(r.entry_texts),
        queries_per_s=n / query_s if query_s > 0 else float("inf"),
        timings_s={**r.timings_s, "decide": t1 - t0}, search=SEARCH_LABEL.get(search, search),
        decision="verifier" if verifier is not None else "cosine", extra=extra,
    )


def search_recall(r: Retrieved) -> float:
    """Share of queries whose own entry the search returned among the top-k (the ceiling on recall)."""
    dup = r.labels == 1
    found = (r.idx == r.own[:, None]).any(axis=1)
    return float(found[dup].mean()) if dup.any() else 0.0


def train(pairs: Sequence[Pair], encoder: Encoder, out: Path, *, seed: int = 0,
          fractions: tuple[float, float, float] = DEFAULT_FRACTIONS, top_k: int = 5, search: str = "hnswlib",
          kind: str = "hgb", target_precision: float = 0.99, max_train: int = 0, sampled: tuple[int, int] = (0, 0),
          cache_sizes: Sequence[int] = (), features_version: int = FEATURES_VERSION, calibrate_on: str = "mixed",
          log: Log = lambda _: None) -> tuple[Verifier, dict[str, Any]]:
    """Split, train on the train split's retrieved candidates, calibrate the threshold on the
    calibration split (as its own cache), write the artefact. The evaluation split is not touched.
    `sampled`: (limit, seed) if `pairs` is a sample of a file, recorded so `held_out` can redo it.
    `cache_sizes`: train on several caches of these sizes (see `verifier.chunks`) instead of one.
    `calibrate_on`: "mixed" (all calibration pairs, hard negatives included) or "duplicates" (only
    its duplicate pairs: GPTCache's setting, every query has its paraphrase cached)."""
    if calibrate_on not in ("mixed", "duplicates"):
        raise ValueError(f"calibrate_on must be mixed or duplicates, not {calibrate_on!r}")
    split = split_pairs(pairs, seed, fractions)
    log(f"split: {split.summary()}")
    train_pairs = split.train
    if max_train and len(train_pairs) > max_train:
        pick = np.sort(np.random.default_rng(seed).choice(len(train_pairs), max_train, replace=False))
        train_pairs = [train_pairs[int(i)] for i in pick]
    t0 = time.perf_counter()
    xs, ys = [], []
    groups = chunks(len(train_pairs), cache_sizes, seed)
    for g in groups:
        tr = retrieve([train_pairs[int(i)] for i in g], encoder, top_k, search)
        xg, yg = training_rows(tr, features_version)
        xs.append(xg)
        ys.append(yg)
    x, y = (np.concatenate(xs), np.concatenate(ys)) if len(xs) > 1 else (xs[0], ys[0])
    del xs, ys
    t1 = time.perf_counter()
    log(f"training rows: {len(y)} ({int(y.sum())} positive) from {len(train_pairs)} pairs in {len(groups)} "
        f"cache(s), {t1 - t0:.1f}s")
    model = fit(x, y, kind, seed)
    t2 = time.perf_counter()
    log(f"fitted {type(model).__name__} in {t2 - t1:.1f}s")
    dim = int(tr.entries.shape[1])
    manifest: dict[str, Any] = {
        "model": encoder.name, "dim": dim, "top_k": top_k, "search": search,
        **describe(model, dim, features_version), "target_precision": target_precision,
        "training_caches": {"sizes": list(cache_sizes) or [len(train_pairs)], "count": len(groups)},
        "split": {"seed": seed, "fractions": list(fractions), **split.summary(), "train_used": len(train_pairs)},
        "data": {"pairs": len(pairs), "digest": pairs_digest(pairs), "limit": sampled[0], "sample_seed": sampled[1]},
        "training": {"rows": len(y), "positives": int(y.sum()), "seconds": round(t2 - t1, 1)},
    }
    verifier = Verifier(model, manifest)
    cal_pairs = split.calibration if calibrate_on == "mixed" else [p for p in split.calibration if p.label == 1]
    cal = retrieve(cal_pairs, encoder, top_k, search)
    res = evaluate_retrieved(cal, VERIFIER_THRESHOLDS, target_precision, encoder.name, search, verifier)
    # The calibration split is small: the target must hold for the precision's 95% lower bound.
    res.chosen = choose_threshold(res.sweep, target_precision, z=CALIBRATION_Z)
    manifest["threshold"] = res.chosen.threshold if res.chosen else None
    manifest["calibration"] = {"rule": "lowest threshold whose precision's Wilson 95% lower bound >= target",
                               "on": calibrate_on,
                               "pairs": res.pairs, "duplicates": res.duplicates, "entries": res.entries,
                               "chosen": None if res.chosen is None else {
                                   "threshold": res.chosen.threshold, "precision": res.chosen.precision,
                                   "recall": res.chosen.recall, "correct_hits": res.chosen.correct_hits,
                                   "wrong_hits": res.chosen.wrong_hits}}
    save_verifier(model, out, manifest)
    manifest["path"] = str(out)
    log(f"calibration: threshold {manifest['threshold']} for precision >= {target_precision}: "
        f"{manifest['calibration']['chosen']}")
    return verifier, {"manifest": manifest, "calibration_sweep": res.to_json()["sweep"]}


def held_out(pairs: Sequence[Pair], verifier: Verifier) -> list[Pair] | None:
    """The evaluation split the verifier never saw if `pairs` is the data it was trained on, else None."""
    split = verifier.manifest.get("split") or {}
    data = verifier.manifest.get("data") or {}
    if data.get("limit"):  # trained on a sample of the file: take the same sample
        pairs = sample_pairs(pairs, int(data["limit"]), int(data.get("sample_seed", 0)))
    if data.get("digest") != pairs_digest(pairs):
        return None  # another data set: nothing of it was trained on
    fr = split.get("fractions", DEFAULT_FRACTIONS)
    return split_pairs(pairs, int(split.get("seed", 0)), (float(fr[0]), float(fr[1]), float(fr[2]))).evaluation


def exact_recall_of(r: Retrieved) -> float:
    """recall@1 of the search against exact search on the same embeddings."""
    truth, _ = Exact(r.entries).search(r.queries, 1)
    return float(np.mean(truth[:, 0] == r.idx[:, 0]))
