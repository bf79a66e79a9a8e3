"""The exact-cache lever in the request path: plan the key, serve a hit, store a complete answer.
A hit is still a ledger event: zero cost, cache_hit=exact, the cost it avoided."""

from __future__ import annotations

import logging
import time
from typing import Any

from margin.config import CacheConfig
from margin.domain import Call, Cost, Event, RouteDecision, Usage
from margin.gateway import levers
from margin.gateway.stream import Out
from margin.policy import cache as cache_policy
from margin.pricing import PriceBook
from margin.state import StateUnavailable
from margin.state.cache import Cache, CachedAnswer
from margin.telemetry import Telemetry

log = logging.getLogger("margin.gateway")
Headers = list[tuple[bytes, bytes]]
JSON_HEADERS: Headers = [(b"content-type", b"application/json")]
SSE_HEADERS: Headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]


async def serve_hit(hit: CachedAnswer, kind: str, call: Call, decision: RouteDecision, ev: Event, out: Out,
                    prices: PriceBook, headers: Headers, action: dict[str, Any]) -> None:
    """Answer from a cache (exact or semantic): zero cost, and the cost and tokens it avoided."""
    saved = Usage(input_tokens=hit.input_tokens, output_tokens=hit.output_tokens,
                  cached_input_tokens=hit.cached_input_tokens, reasoning_tokens=hit.reasoning_tokens)
    ev.cache_hit = kind
    ev.cost = Cost(price_source="cache hit")
    levers.saved(ev, "cache", prices.cost(decision.model, saved).total_usd, saved.total_tokens)
    # The tokens the provider would have processed: exports replay a hit as the request it was.
    ev.actions.append({"action": "cache_hit", **action, "input_tokens": hit.input_tokens,
                       "output_tokens": hit.output_tokens})
    if call.stream:
        await out.start(200, [*SSE_HEADERS, *headers])
        for c in hit.chunks:
            await out.chunk(c.encode())
    else:
        await out.respond(200, [*JSON_HEADERS, *headers], hit.body.encode())


class CacheLever:
    def __init__(self, cache: Cache | None, cfg: CacheConfig | None, prices: PriceBook,
                 telemetry: Telemetry | None = None):
        self.cache, self.cfg, self.prices = cache, cfg, prices
        lookups = (telemetry or Telemetry()).cache_lookups
        self.hits, self.misses = lookups.labels("hit"), lookups.labels("miss")  # bound once: hot path

    def plan(self, call: Call, decision: RouteDecision, payload: dict[str, Any],
                    headers: dict[str, str]) -> tuple[str | None, bool, bool]:
        c = self.cfg
        if self.cache is None or c is None:
            return None, False, False
        may_read, may_write = cache_policy.directives(headers.get("cache-control", ""))
        if not (may_read or may_write) or not cache_policy.cacheable(payload, c.allow_nondeterministic):
            return None, False, False
        tenant = cache_policy.tenant(call.attribution, c.scope)
        return cache_policy.cache_key(call.endpoint, decision.model, payload, tenant), may_read, may_write

    async def serve(self, key: str, call: Call, decision: RouteDecision, ev: Event, out: Out,
                    route_headers: Headers) -> bool:
        assert self.cache is not None
        t = time.perf_counter()
        try:
            hit = await self.cache.get(key)
        except StateUnavailable as e:
            log.warning("cache unavailable, treated as a miss: %s", e)
            return False
        if hit is None:
            return False
        await serve_hit(hit, "exact", call, decision, ev, out, self.prices,
                        [*route_headers, (b"x-margin-cache", b"hit"), (b"x-margin-cost-usd", b"0")],
                        {"lookup_ms": round((time.perf_counter() - t) * 1000, 3)})
        return True

    async def put(self, key: str, decision: RouteDecision, ev: Event, body: str = "",
                         chunks: list[str] | None = None) -> None:
        assert self.cache is not None and self.cfg is not None
        u = ev.usage
        answer = CachedAnswer(decision.model, body, chunks or [], u.input_tokens, u.output_tokens,
                              u.cached_input_tokens, u.reasoning_tokens)
        try:
            await self.cache.put(key, answer, self.cfg.ttl_s)
        except StateUnavailable as e:
            log.warning("cache unavailable, answer not stored: %s", e)
