"""Semantic-cache entries of one replica: an ANN index (hnswlib HNSW, cosine) per (tenant, context
hash) namespace, bounded by TTL, entries per tenant and entries in all (least recently used go first).

Not thread-safe by design: the gateway runs every operation on one worker thread (embedding is
done there too), so no lock is needed and the event loop never waits on the index. Time is an
argument (`now`, seconds on any monotonic clock), so tests control expiry.

In-process per replica; with `semantic_cache.backend: redis://...` replicas share their entries
through a Redis stream (`state.semantic_share`), each indexing the others' as they arrive.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from margin.state.cache import CachedAnswer

Vector = npt.NDArray[np.float32]


@dataclass(slots=True)
class Entry:
    id: int
    tenant: str
    context: str
    text: str
    vector: Vector
    answer: CachedAnswer
    expires: float


class _Namespace:
    """One tenant's entries under one context hash, with its own HNSW index (hnswlib, inner product
    on normalised vectors = cosine). Deleted slots are reused; the index doubles when full."""

    def __init__(self, dim: int) -> None:
        import hnswlib

        self.index: Any = hnswlib.Index(space="ip", dim=dim)
        self.capacity = 64
        self.index.init_index(max_elements=self.capacity, ef_construction=128, M=16, allow_replace_deleted=True)
        self.index.set_ef(64)
        self.index.set_num_threads(1)  # one query at a time, on the semantic worker thread
        self.vectors: dict[int, Vector] = {}
        self.by_text: dict[str, int] = {}

    def add(self, e: Entry) -> None:
        if len(self.vectors) >= self.capacity:
            self.capacity *= 2
            self.index.resize_index(self.capacity)
        self.index.add_items(e.vector[None, :], [e.id], replace_deleted=True)
        self.vectors[e.id] = e.vector
        self.by_text[e.text] = e.id

    def remove(self, e: Entry) -> None:
        if self.vectors.pop(e.id, None) is not None:
            self.index.mark_deleted(e.id)
        if self.by_text.get(e.text) == e.id:
            del self.by_text[e.text]

    def search(self, vector: Vector, k: int) -> list[tuple[int, float]]:
        k = min(k, len(self.vectors))
        if k == 0:
            return []
        try:
            labels, dist = self.index.knn_query(vector[None, :], k=k)
        except RuntimeError:  # HNSW can come back short after many deletions: search exactly instead
            ids = list(self.vectors)
            sims = np.stack([self.vectors[i] for i in ids]) @ vector
            top = np.argsort(-sims)[:k]
            return [(ids[int(j)], float(sims[j])) for j in top]
        return [(int(i), float(1.0 - d)) for i, d in zip(labels[0], dist[0], strict=True)]


class SemanticStore:
    def __init__(self, dim: int, max_entries: int = 100_000, max_entries_per_tenant: int = 10_000) -> None:
        if max_entries < 1 or max_entries_per_tenant < 1:
            raise ValueError("max_entries and max_entries_per_tenant must be >= 1")
        self.dim, self.max_entries, self.max_per_tenant = dim, max_entries, max_entries_per_tenant
        self._entries: OrderedDict[int, Entry] = OrderedDict()  # least recently used first
        self._tenants: dict[str, OrderedDict[int, None]] = {}
        self._spaces: dict[tuple[str, str], _Namespace] = {}
        self._next = 1

    def __len__(self) -> int:
        return len(self._entries)

    def tenant_size(self, tenant: str) -> int:
        return len(self._tenants.get(tenant, ()))

    def _drop(self, e: Entry) -> None:
        self._entries.pop(e.id, None)
        t = self._tenants.get(e.tenant)
        if t is not None:
            t.pop(e.id, None)
            if not t:
                del self._tenants[e.tenant]
        space = self._spaces.get((e.tenant, e.context))
        if space is not None:
            space.remove(e)
            if not space.vectors:
                del self._spaces[(e.tenant, e.context)]

    def _touch(self, e: Entry) -> None:
        self._entries.move_to_end(e.id)
        self._tenants[e.tenant].move_to_end(e.id)

    def search(self, tenant: str, context: str, vector: Vector, k: int, now: float) -> list[tuple[Entry, float]]:
        """Up to k live entries of this tenant and context, nearest first, with their cosine."""
        space = self._spaces.get((tenant, context))
        if space is None:
            return []
        found: list[tuple[Entry, float]] = []
        for i, sim in space.search(np.asarray(vector, dtype=np.float32), k):
            e = self._entries.get(i)
            if e is None:
                continue
            if e.expires <= now:
                self._drop(e)
                continue
            # The namespace is keyed by (tenant, context); checking again costs nothing and makes
            # a cross-tenant answer impossible even if an index returned a stale key.
            if e.tenant == tenant and e.context == context:
                found.append((e, sim))
        return found

    def used(self, e: Entry) -> None:
        """A served entry becomes the most recently used."""
        if e.id in self._entries:
            self._touch(e)

    def add(self, tenant: str, context: str, text: str, vector: Vector, answer: CachedAnswer, ttl_s: float,
            now: float) -> Entry:
        """Store (or replace) the answer for this text; evict what the bounds require."""
        space = self._spaces.get((tenant, context))
        if space is None:
            space = self._spaces[(tenant, context)] = _Namespace(self.dim)
        old = space.by_text.get(text)
        if old is not None and old in self._entries:
            self._drop(self._entries[old])
            space = self._spaces.setdefault((tenant, context), space)
        e = Entry(self._next, tenant, context, text, np.asarray(vector, dtype=np.float32).reshape(-1), answer,
                  now + ttl_s)
        self._next += 1
        space.add(e)
        self._entries[e.id] = e
        self._tenants.setdefault(tenant, OrderedDict())[e.id] = None
        while self.tenant_size(tenant) > self.max_per_tenant:
            self._drop(self._entries[next(iter(self._tenants[tenant]))])
        while len(self._entries) > self.max_entries:
            self._drop(next(iter(self._entries.values())))
        return e

    def expire(self, now: float) -> int:
        """Drop every expired entry (the gateway calls this now and then); returns how many."""
        dead = [e for e in self._entries.values() if e.expires <= now]
        for e in dead:
            self._drop(e)
        return len(dead)
