"""The semantic-cache lever in the request path (opt-in per route; docs/caching.md).

After an exact-cache miss, the last user turn is embedded (all-MiniLM-L6-v2 on ONNX Runtime) and
the tenant's entries with the same context hash are searched (hnswlib HNSW); the verifier, if the
route has one, scores the top-k and the best is served when its score reaches the threshold - as a
ledger event with cache_hit=semantic, zero provider cost and the cost it avoided, replayed as SSE
for a stream, exactly like an exact hit. A complete answer is stored the same way.

Embedding takes milliseconds of CPU: it runs on one worker thread, never on the event loop, and
only for routes that opted in. That thread owns the index (no locks); when more than
`max_pending` lookups wait for it, new ones are skipped (a miss), so a burst cannot queue
requests behind the embedder.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from margin.config import Config, SemanticCacheConfig, SemanticRouteConfig
from margin.domain import Call, Event, RouteDecision
from margin.gateway.caching import Headers, serve_hit
from margin.gateway.stream import Out
from margin.policy import cache as cache_policy
from margin.policy import semantic as policy
from margin.pricing import PriceBook
from margin.state.cache import CachedAnswer
from margin.state.semantic import Entry, SemanticStore
from margin.state.semantic_share import SharedEntries, SharedEntry
from margin.tasks import cancel_and_wait

log = logging.getLogger("margin.gateway")


@dataclass(slots=True)
class Route:
    threshold: float
    top_k: int
    min_similarity: float
    verifier: Any = None  # cache_eval.verifier.Verifier


@dataclass(slots=True)
class Plan:
    key: policy.SemanticKey
    route: Route
    may_read: bool
    may_write: bool
    vector: Any = None  # the embedding, once computed (a lookup's is reused by the store)


@dataclass(slots=True)
class Found:
    entry: Entry | None
    score: float
    similarity: float
    candidates: int


def routes(cfg: Config) -> dict[str, SemanticRouteConfig]:
    """Route name (a model or a group) -> its semantic-cache settings, for routes that opted in."""
    out = {m.name: m.semantic_cache for m in cfg.models if m.semantic_cache is not None}
    out.update({g.name: g.semantic_cache for g in cfg.groups if g.semantic_cache is not None})
    return out


def make(cfg: Config, prices: PriceBook) -> SemanticLever | None:
    """The lever, or None when no route opted in (then nothing of it is imported or loaded)."""
    opted = routes(cfg)
    return SemanticLever(cfg.semantic_cache, opted, prices) if opted else None


class SemanticLever:
    def __init__(self, cfg: SemanticCacheConfig, settings: dict[str, SemanticRouteConfig], prices: PriceBook,
                 encoder: Any = None):
        self.cfg, self.prices = cfg, prices
        self.routes: dict[str, Route] = {}
        for name, s in settings.items():
            verifier = None
            if s.verifier:
                from margin.cache_eval.artefact import load_verifier  # scikit-learn only when used

                verifier = load_verifier(s.verifier)
            threshold = s.threshold if s.threshold is not None else (verifier.threshold if verifier else None)
            if threshold is None:
                raise ValueError(f"route {name!r}: semantic_cache needs a threshold (the verifier "
                                 f"{s.verifier} has none calibrated)")
            self.routes[name] = Route(threshold, s.top_k or (verifier.top_k if verifier else 5), s.min_similarity,
                                      verifier)
        self.encoder = encoder
        self.store: SemanticStore | None = None
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="margin-semantic")
        self.pending = 0
        self.stats = {"hits": 0, "misses": 0, "skipped": 0, "stored": 0, "shared_in": 0, "share_errors": 0}
        self.shared: SharedEntries | None = None  # entries shared by replicas (semantic_cache.backend: redis://)
        self._follower: asyncio.Task[None] | None = None
        self._publishing: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Load the embedder (exporting the ONNX model on first use) on the worker thread; with a
        shared backend, start following the other replicas' entries."""
        await asyncio.get_running_loop().run_in_executor(self.pool, self._load)
        if self.cfg.backend != "memory":
            self.shared = SharedEntries(self.cfg.backend, self.cfg.max_entries)
            self._follower = asyncio.create_task(self._follow(), name="margin-semantic-follower")

    async def _follow(self) -> None:
        """Index what the other replicas store, as it arrives (from the stream's start at first)."""
        assert self.shared is not None
        loop, backoff = asyncio.get_running_loop(), 0.5
        while True:
            try:
                entries = await self.shared.follow(time.time())
                backoff = 0.5
            except asyncio.CancelledError:
                raise
            except Exception as e:  # Redis down: serve what this replica has, catch up later
                self.stats["share_errors"] += 1
                log.warning("semantic cache: cannot read shared entries (%s); retrying in %.1f s", e, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
                continue
            if entries:
                try:
                    await loop.run_in_executor(self.pool, self._ingest, entries)
                except Exception as e:  # an index error must not stop the sharing for good
                    self.stats["share_errors"] += 1
                    log.warning("semantic cache: could not index %d shared entries: %s", len(entries), e)

    def _ingest(self, entries: list[SharedEntry]) -> None:
        assert self.store is not None
        now, wall = time.monotonic(), time.time()
        for e in entries:
            if e.expires_at > wall and len(e.vector) == self.store.dim:
                self.store.add(e.tenant, e.context, e.text, e.vector, e.answer, e.expires_at - wall, now)
                self.stats["shared_in"] += 1

    def _load(self) -> None:
        if self.encoder is None:
            if self.cfg.embedder == "onnx":
                from margin.cache_eval.onnx_embed import OnnxMiniLM

                self.encoder = OnnxMiniLM(self.cfg.onnx_path, threads=self.cfg.threads, batch_size=8)
            else:
                from margin.cache_eval.embed import MiniLM

                self.encoder = MiniLM(batch_size=8, threads=self.cfg.threads)
        if any(r.verifier is not None for r in self.routes.values()):
            # scikit-learn's trees predict with OpenMP threads; for 5 rows they only add contention.
            from threadpoolctl import threadpool_limits

            threadpool_limits(1, user_api="openmp")
        dim = int(self.encoder.encode(["warm up"]).shape[1])
        self.store = SemanticStore(dim, self.cfg.max_entries, self.cfg.max_entries_per_tenant)

    def health(self) -> dict[str, Any]:
        """For /health: counts since start, entries held, and whether entries are shared."""
        return {**self.stats, "entries": len(self.store) if self.store is not None else 0,
                "backend": "memory" if self.cfg.backend == "memory" else "redis"}

    async def close(self) -> None:
        """Never raises: the gateway's shutdown goes on to flush the ledger after this."""
        try:
            await cancel_and_wait(self._follower)
            for t in list(self._publishing):
                await cancel_and_wait(t)
            if self.shared is not None:
                await self.shared.close()
        except Exception as e:
            log.warning("semantic cache: error while closing: %s", e)
        finally:
            self.pool.shutdown(wait=False, cancel_futures=True)

    def plan(self, call: Call, decision: RouteDecision, payload: dict[str, Any],
             headers: dict[str, str]) -> Plan | None:
        """Cheap and synchronous: does this request take part, and under which key."""
        route = self.routes.get(call.requested_model)
        if route is None:
            return None
        may_read, may_write = cache_policy.directives(headers.get("cache-control", ""))
        if not (may_read or may_write) or not cache_policy.cacheable(payload, self.cfg.allow_nondeterministic):
            return None
        tenant = cache_policy.tenant(call.attribution, self.cfg.scope)
        k = policy.key(call.endpoint, decision.model, payload, tenant, self.cfg.max_text_chars)
        return None if k is None else Plan(k, route, may_read, may_write)

    async def _run(self, fn: Any, *args: Any) -> Any:
        self.pending += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)
        finally:
            self.pending -= 1

    def _lookup(self, plan: Plan) -> Found:
        """On the worker thread: embed, search the namespace, score, choose."""
        assert self.store is not None and self.encoder is not None
        plan.vector = self.encoder.encode([plan.key.text])[0]
        k, r = plan.key, plan.route
        found = self.store.search(k.tenant, k.context, plan.vector, r.top_k, time.monotonic())
        if not found:
            return Found(None, -1.0, -1.0, 0)
        if r.verifier is None:
            scores = [s for _, s in found]
        else:
            # As in training: k slots, the missing ones padded (index -1, cosine -1), so features
            # such as the best's lead over the second mean the same with few entries as with many.
            n, kk = len(found), max(r.top_k, len(found))
            idx = np.array([[*range(n), *([-1] * (kk - n))]], dtype=np.int64)
            sims = np.array([[*(s for _, s in found), *([-1.0] * (kk - n))]], dtype=np.float32)
            scores = list(r.verifier.score([k.text], plan.vector[None, :], idx, sims, [e.text for e, _ in found],
                                           np.stack([e.vector for e, _ in found]))[0][:n])
        scores = [1.0 if policy.same_words(k.text, e.text) else sc if s >= r.min_similarity else -1.0
                  for sc, (e, s) in zip(scores, found, strict=True)]
        best = policy.choose(scores, r.threshold)
        if best is None:
            return Found(None, float(max(scores)), float(found[0][1]), len(found))
        self.store.used(found[best][0])
        return Found(found[best][0], float(scores[best]), float(found[best][1]), len(found))

    async def serve(self, plan: Plan, call: Call, decision: RouteDecision, ev: Event, out: Out,
                    route_headers: Headers) -> bool:
        """Look up; on a hit answer from the stored entry and meter it. False: go on to the provider."""
        if not plan.may_read or self.store is None:
            return False
        if self.pending >= self.cfg.max_pending:
            self.stats["skipped"] += 1
            ev.actions.append({"action": "semantic_skipped", "why": "busy"})
            return False
        t = time.perf_counter()
        try:
            f: Found = await self._run(self._lookup, plan)
        except Exception as e:  # the cache must never fail a request
            log.warning("semantic cache lookup failed, treated as a miss: %s", e)
            return False
        lookup_ms = round((time.perf_counter() - t) * 1000, 3)
        if f.entry is None:
            self.stats["misses"] += 1
            ev.actions.append({"action": "semantic_miss", "lookup_ms": lookup_ms, "candidates": f.candidates,
                               "best_score": round(f.score, 4)})
            return False
        self.stats["hits"] += 1
        h = [*route_headers, (b"x-margin-cache", b"semantic"), (b"x-margin-cache-score", f"{f.score:.4f}".encode()),
             (b"x-margin-cost-usd", b"0")]
        await serve_hit(f.entry.answer, "semantic", call, decision, ev, out, self.prices, h,
                        {"kind": "semantic", "lookup_ms": lookup_ms, "score": round(f.score, 4),
                         "similarity": round(f.similarity, 4), "verifier": plan.route.verifier is not None})
        return True

    def _store(self, plan: Plan, answer: CachedAnswer) -> Any:
        assert self.store is not None and self.encoder is not None
        vector = plan.vector if plan.vector is not None else self.encoder.encode([plan.key.text])[0]
        now = time.monotonic()
        self.store.add(plan.key.tenant, plan.key.context, plan.key.text, vector, answer, self.cfg.ttl_s, now)
        if self.stats["stored"] % 1000 == 0:
            self.store.expire(now)
        return vector

    async def put(self, plan: Plan, decision: RouteDecision, ev: Event, body: str = "",
                  chunks: list[str] | None = None) -> None:
        """Remember a complete, successful answer (called where the exact cache stores)."""
        if not plan.may_write or self.store is None or ev.status != 200:
            return
        if self.pending >= self.cfg.max_pending:
            return
        u = ev.usage
        answer = CachedAnswer(decision.model, body, chunks or [], u.input_tokens, u.output_tokens,
                              u.cached_input_tokens, u.reasoning_tokens)
        try:
            vector = await self._run(self._store, plan, answer)
            self.stats["stored"] += 1
        except Exception as e:
            log.warning("semantic cache store failed: %s", e)
            return
        if self.shared is not None:
            if len(self._publishing) >= self.cfg.max_pending:  # Redis slow or down: do not pile up
                self.stats["share_errors"] += 1
                return
            k = plan.key
            entry = SharedEntry(k.tenant, k.context, k.text, vector, answer, time.time() + self.cfg.ttl_s)
            # In the background: the request's event and budget settlement do not wait for Redis.
            task = asyncio.create_task(self._publish(entry))
            self._publishing.add(task)
            task.add_done_callback(self._publishing.discard)

    async def _publish(self, entry: SharedEntry) -> None:
        assert self.shared is not None
        try:
            await self.shared.publish(entry)
        except Exception as e:  # the others miss this one; this replica still has it
            self.stats["share_errors"] += 1
            log.warning("semantic cache: entry not shared with other replicas: %s", e)
