"""A second count beside GPTCache's: by the data's own duplicate clusters.

GPTCache's counting calls a hit wrong whenever the entry served is not the query's own pair's entry,
even when the data itself labels the two questions duplicates. QQP has clusters of equivalent
questions ("How can I lose weight quickly?" is in 28 pairs), so on QQP part of every "wrong" count is
a right answer by the labels. Here a hit is correct when the entry served is in the query's
duplicate cluster: connected to it through label-1 pairs anywhere in the file (transitively, so a
cluster can also hold a mislabelled link). Recall's denominator is the queries whose cluster has an
entry in the cache. The issue's target is judged with GPTCache's counting; this one explains it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from margin.cache_eval.evaluate import Pair, SweepRow


def duplicate_clusters(pairs: Sequence[Pair]) -> dict[str, int]:
    """Text -> cluster id, joining the two texts of every duplicate (label 1) pair (union-find)."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]  # path halving
            x = parent[x]
        return x

    for p in pairs:
        ra, rb = find(p.text_a), find(p.text_b)
        if p.label == 1 and ra != rb:
            parent[ra] = rb
    ids: dict[str, int] = {}
    return {t: ids.setdefault(find(t), len(ids)) for t in parent}


def one_per_cluster(pairs: Sequence[Pair], clusters: dict[str, int], seed: int = 0) -> list[Pair]:
    """At most one pair per duplicate cluster (drawn with a fixed seed; original order kept).

    GPTCache's benchmark caches 999 distinct questions, each queried by its one paraphrase. On QQP a
    random sample instead caches several equivalent questions of one cluster, and GPTCache's counting
    then scores serving a labelled equivalent as wrong. One pair per cluster is the QQP sample
    closest to GPTCache's setting: every query has exactly one labelled paraphrase in the cache.
    """
    order = np.random.default_rng(seed).permutation(len(pairs))
    kept: dict[int, int] = {}
    for i in order:
        p = pairs[int(i)]
        ca, cb = clusters.get(p.text_a, -1), clusters.get(p.text_b, -2)
        if ca != cb or ca in kept:  # not a labelled duplicate, or its cluster is taken
            continue
        kept[ca] = int(i)
    return [pairs[i] for i in sorted(kept.values())]


def cluster_sweep(best_idx: npt.NDArray[np.int64], best_score: npt.NDArray[np.float32], query_texts: Sequence[str],
                  entry_texts: Sequence[str], clusters: dict[str, int],
                  thresholds: Sequence[float]) -> tuple[list[SweepRow], int]:
    """The sweep with a hit counted correct when the served entry shares the query's duplicate cluster,
    and the number of answerable queries (their cluster has an entry in the cache)."""
    unknown = -1 - np.arange(len(query_texts) + len(entry_texts))  # texts outside the file: clusters of one
    qc = np.array([clusters.get(t, int(unknown[i])) for i, t in enumerate(query_texts)], dtype=np.int64)
    ec = np.array([clusters.get(t, int(unknown[len(query_texts) + j])) for j, t in enumerate(entry_texts)],
                  dtype=np.int64)
    served_cluster = np.where(best_idx >= 0, ec[np.maximum(best_idx, 0)], np.int64(-(2**62)))
    right = served_cluster == qc
    answerable = np.isin(qc, ec)
    n_ans = int(answerable.sum())
    rows: list[SweepRow] = []
    for t in thresholds:
        served = (best_score >= np.float32(t)) & (best_idx >= 0)
        hits = int(served.sum())
        correct = int((served & right).sum())
        rows.append(SweepRow(threshold=float(t), hits=hits, correct_hits=correct, wrong_hits=hits - correct,
                             misses=int(served.size - hits),
                             precision=round(correct / hits, 6) if hits else None,
                             recall=round(correct / n_ans, 6) if n_ans else 0.0))
    return rows, n_ans
