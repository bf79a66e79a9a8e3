"""Nearest-neighbour search over normalised embeddings: exact (numpy) and three ANN libraries
(usearch, hnswlib, faiss-cpu) behind one interface, and the measurement that chose between them
(`margin cache bench-ann`; numbers in docs/caching.md).

Every searcher returns (idx, sims) of shape (n, k), best first; a missing neighbour (fewer than k
entries) is index -1 with similarity -1.0.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from margin.cache_eval.embed import Matrix

Ids = npt.NDArray[np.int64]
Sims = npt.NDArray[np.float32]
KINDS = ("exact", "usearch", "hnswlib", "faiss")
# HNSW parameters shared by the three libraries, so the comparison is like for like.
M, EF_CONSTRUCTION, EF_SEARCH = 16, 128, 64


class Searcher(Protocol):
    def search(self, queries: Matrix, k: int) -> tuple[Ids, Sims]: ...


def _pad(idx: Ids, sims: Sims, k: int) -> tuple[Ids, Sims]:
    n, got = idx.shape
    if got >= k:
        return idx[:, :k], sims[:, :k]
    return (np.hstack([idx, np.full((n, k - got), -1, np.int64)]),
            np.hstack([sims, np.full((n, k - got), -1.0, np.float32)]))


class Exact:
    def __init__(self, entries: Matrix, chunk: int = 2048) -> None:
        self.entries, self.chunk = entries, chunk

    def search(self, queries: Matrix, k: int) -> tuple[Ids, Sims]:
        n, m = queries.shape[0], self.entries.shape[0]
        kk = min(k, m)
        idx = np.full((n, k), -1, np.int64)
        sims = np.full((n, k), -1.0, np.float32)
        for s in range(0, n, self.chunk):
            if kk == 0:
                break
            scores = queries[s : s + self.chunk] @ self.entries.T
            part = (np.argpartition(-scores, kk - 1, axis=1)[:, :kk] if kk < m
                    else np.tile(np.arange(m), (len(scores), 1)))
            ps = np.take_along_axis(scores, part, axis=1)
            order = np.argsort(-ps, axis=1, kind="stable")
            idx[s : s + self.chunk, :kk] = np.take_along_axis(part, order, axis=1)
            sims[s : s + self.chunk, :kk] = np.take_along_axis(ps, order, axis=1)
        return idx, sims


class USearch:
    def __init__(self, entries: Matrix) -> None:
        from usearch.index import Index

        self.index: Any = Index(ndim=entries.shape[1], metric="cos", dtype="f32", connectivity=M,
                                expansion_add=EF_CONSTRUCTION, expansion_search=EF_SEARCH)
        if len(entries):
            self.index.add(np.arange(len(entries), dtype=np.uint64), entries)

    def search(self, queries: Matrix, k: int) -> tuple[Ids, Sims]:
        if len(self.index) == 0:
            return _pad(np.zeros((len(queries), 0), np.int64), np.zeros((len(queries), 0), np.float32), k)
        m = self.index.search(queries, k)
        keys = np.asarray(m.keys, dtype=np.int64).reshape(len(queries), -1)
        dist = np.asarray(m.distances, dtype=np.float32).reshape(len(queries), -1)
        counts = np.asarray(getattr(m, "counts", [keys.shape[1]] * len(queries))).reshape(-1)
        valid = np.arange(keys.shape[1])[None, :] < counts[:, None]
        sims = np.where(valid, 1.0 - np.nan_to_num(dist, nan=2.0), -1.0).astype(np.float32)
        return _pad(np.where(valid, keys, -1), sims, k)


class Hnswlib:
    def __init__(self, entries: Matrix) -> None:
        import hnswlib

        self.n = len(entries)
        self.index: Any = hnswlib.Index(space="ip", dim=entries.shape[1])
        self.index.init_index(max_elements=max(1, self.n), ef_construction=EF_CONSTRUCTION, M=M)
        if self.n:
            self.index.add_items(entries, np.arange(self.n))
        self.index.set_ef(EF_SEARCH)

    def search(self, queries: Matrix, k: int) -> tuple[Ids, Sims]:
        kk = min(k, self.n)
        if kk == 0:
            return _pad(np.zeros((len(queries), 0), np.int64), np.zeros((len(queries), 0), np.float32), k)
        self.index.set_ef(max(EF_SEARCH, kk))
        labels, dist = self.index.knn_query(queries, k=kk)
        return _pad(labels.astype(np.int64), (1.0 - dist).astype(np.float32), k)


class Faiss:
    def __init__(self, entries: Matrix) -> None:
        import faiss

        self.index: Any = faiss.IndexHNSWFlat(entries.shape[1], M, faiss.METRIC_INNER_PRODUCT)
        self.index.hnsw.efConstruction = EF_CONSTRUCTION
        self.index.hnsw.efSearch = EF_SEARCH
        if len(entries):
            self.index.add(np.ascontiguousarray(entries))

    def search(self, queries: Matrix, k: int) -> tuple[Ids, Sims]:
        sims, idx = self.index.search(np.ascontiguousarray(queries), k)
        idx = idx.astype(np.int64)
        return idx, np.where(idx >= 0, sims, -1.0).astype(np.float32)


BUILDERS: dict[str, Callable[[Matrix], Searcher]] = {"exact": Exact, "usearch": USearch, "hnswlib": Hnswlib,
                                                     "faiss": Faiss}


def build(kind: str, entries: Matrix) -> Searcher:
    if kind not in BUILDERS:
        raise ValueError(f"unknown search {kind!r}; choose one of {', '.join(KINDS)}")
    return BUILDERS[kind](np.ascontiguousarray(entries, dtype=np.float32))


def bench(entries: Matrix, queries: Matrix, k: int = 5, kinds: tuple[str, ...] = KINDS,
          single: int = 500) -> list[dict[str, Any]]:
    """Build time, batch and one-at-a-time query time, and recall against exact search.

    recall@1: share of queries whose nearest entry is the exact nearest; recall@k: share of the
    exact top-k found in the returned top-k."""
    truth_idx, _ = Exact(entries).search(queries, k)
    out: list[dict[str, Any]] = []
    for kind in kinds:
        t0 = time.perf_counter()
        s = build(kind, entries)
        t1 = time.perf_counter()
        idx, _ = s.search(queries, k)
        t2 = time.perf_counter()
        for i in range(min(single, len(queries))):
            s.search(queries[i : i + 1], k)
        t3 = time.perf_counter()
        hits_k = sum(len(set(a[a >= 0]) & set(b[b >= 0])) for a, b in zip(idx, truth_idx, strict=True))
        out.append({
            "search": kind, "entries": len(entries), "queries": len(queries), "k": k,
            "build_s": round(t1 - t0, 3), "batch_query_us": round((t2 - t1) / max(1, len(queries)) * 1e6, 1),
            "single_query_us": round((t3 - t2) / max(1, min(single, len(queries))) * 1e6, 1),
            "recall_at_1": round(float(np.mean(idx[:, 0] == truth_idx[:, 0])), 4),
            "recall_at_k": round(hits_k / max(1, int((truth_idx >= 0).sum())), 4),
        })
    return out
