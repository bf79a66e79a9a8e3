"""The ASGI shell: read the request, dispatch, write the response. A bare ASGI callable rather
than a framework, because every microsecond here is added to every model call."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from margin import wiring
from margin.config import Config
from margin.domain import Endpoint
from margin.gateway import admin, audit
from margin.gateway.auth import KeyRing
from margin.gateway.batch_worker import BatchLane
from margin.gateway.batches import PREFIXES as BATCH_PREFIXES
from margin.gateway.batches import handle as handle_batches
from margin.gateway.body import read_body
from margin.gateway.budgets import BudgetGuard
from margin.gateway.errors import GatewayError, MethodNotAllowed, NotFound, PayloadTooLarge
from margin.gateway.health import Breakers
from margin.gateway.pipeline import JSON_HEADERS, Headers, Pipeline
from margin.gateway.recovery import recover_spend
from margin.ledger import LedgerWriter, Spool, open_store
from margin.pricing import PriceBook
from margin.providers import make_provider
from margin.providers.base import Provider
from margin.state import MemoryState, make_state
from margin.state.cache import Cache, MemoryCache, RedisCache
from margin.telemetry import Telemetry

log = logging.getLogger("margin.gateway")
Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

ENDPOINTS: dict[str, Endpoint] = {
    "/v1/chat/completions": "chat", "/v1/completions": "completion", "/v1/embeddings": "embedding",
    "/v1/responses": "response",
    "/chat/completions": "chat", "/completions": "completion", "/embeddings": "embedding", "/responses": "response",
}


class AsgiOut:
    """Implements pipeline.Out over ASGI send; watches for a client disconnect while streaming."""

    __slots__ = ("_watch", "disconnected", "receive", "send", "started")

    def __init__(self, send: Send, receive: Receive):
        self.send, self.receive = send, receive
        self.disconnected = False
        self.started = False
        self._watch: asyncio.Task[None] | None = None

    async def respond(self, status: int, headers: Headers, body: bytes) -> None:
        await self.send({"type": "http.response.start", "status": status, "headers": headers})
        await self.send({"type": "http.response.body", "body": body})

    async def start(self, status: int, headers: Headers) -> None:
        self.started = True
        self._watch = asyncio.create_task(self._watch_disconnect())
        await self.send({"type": "http.response.start", "status": status, "headers": headers})

    async def _watch_disconnect(self) -> None:
        while True:
            msg = await self.receive()
            if msg["type"] == "http.disconnect":
                self.disconnected = True
                return

    async def chunk(self, data: bytes) -> None:
        if self.disconnected:
            return
        try:
            await self.send({"type": "http.response.body", "body": data, "more_body": True})
        except OSError:
            self.disconnected = True

    async def finish(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        if self.started and not self.disconnected:
            with contextlib.suppress(OSError):
                await self.send({"type": "http.response.body", "body": b""})


class MarginApp:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.store = open_store(cfg.ledger.url)
        self.telemetry = Telemetry(cfg.telemetry.otlp_endpoint, cfg.telemetry.service_name)
        self.writer = LedgerWriter(
            self.store, Spool(cfg.ledger.spool_dir), batch_size=cfg.ledger.batch_size,
            flush_interval_s=cfg.ledger.flush_interval_ms / 1000, queue_size=cfg.ledger.queue_size,
            retry_interval_s=cfg.ledger.retry_interval_s,
        )
        self.telemetry.bind_ledger(self.ledger_stats)
        self.keys = KeyRing(self.store, cfg.key_cache_ttl_s)
        self.prices = PriceBook(cfg.models)
        self.providers: dict[str, Provider] = {p.name: make_provider(p) for p in cfg.providers}
        from margin.gateway.pools import Pools

        self.pools = Pools(self.providers, self.telemetry)  # self-hosted pools: load gauges, autoscaling advice
        self.targets = wiring.targets(cfg.models, cfg.providers, self.prices)
        self.groups = {g.name: wiring.group(g) for g in cfg.groups}
        self.breakers = Breakers(cfg.circuit_breaker.failures, cfg.circuit_breaker.cooldown_s)
        self.guard = BudgetGuard(cfg, self.prices, make_state(cfg.state), self.telemetry)
        self._refresher: asyncio.Task[None] | None = None
        self.routers = self._load_routers(cfg)
        self.cache: Cache | None = None
        if cfg.cache.enabled:
            self.cache = (MemoryCache(cfg.cache.max_entries) if cfg.cache.backend == "memory"
                          else RedisCache(cfg.cache.backend))
        self.pipeline = Pipeline(self.targets, self.providers, self.prices, self.keys, self.writer, self.telemetry,
                                 self.guard, self.groups, cfg.retry, self.breakers, self.routers, self.cache,
                                 cfg.cache, wiring.compression_routes(cfg), self._load_verifiers(cfg))
        self.max_body = cfg.limits.max_body_bytes
        from margin.gateway.payloads import PayloadLog

        # Opted-in keys only (tag log_payloads=true); the pipeline calls payloads.capture.
        self.payloads = PayloadLog(cfg.ledger.url)
        self.pipeline.payloads = self.payloads
        self.reconciler: Any = None  # Redis counters rebuilt from the ledger (gateway/reconcile.py)
        self.lane: BatchLane | None = None  # the batch lane (issue 5): files, batches, deferred requests
        if cfg.batch_lane.enabled:
            self.lane = self.pipeline.lane = BatchLane(self)
        from margin.gateway import semantic

        self.pipeline.semantic = semantic.make(cfg, self.prices)  # None unless a route opted in
        from margin.gateway.audit import Auditor

        self.audit = Auditor(cfg.ledger.url)  # who changed what (issue 11): admin changes and each start's config

    @property
    def state(self) -> Any:
        """The budget state, for the dashboard (sign-outs every replica honours)."""
        return self.guard.state

    @staticmethod
    def _load_routers(cfg: Config) -> dict[str, tuple[Any, dict[str, str]]]:
        """Trained routers are loaded at start (a bad artefact stops start-up with its reason)."""
        out: dict[str, tuple[Any, dict[str, str]]] = {}
        for g in cfg.groups:
            if g.strategy == "learned" and g.router:
                from margin.router.artefact import load_router  # scikit-learn only when used

                out[g.name] = (load_router(g.router), dict(g.router_models))
        return out

    @staticmethod
    def _load_verifiers(cfg: Config) -> dict[str, tuple[Any, dict[str, str]]]:
        """Learned cascade verifiers are loaded at start (a bad artefact stops start-up with its reason)."""
        out: dict[str, tuple[Any, dict[str, str]]] = {}
        for g in cfg.groups:
            if g.verifier:
                from margin.router.verifier import load_verifier  # scikit-learn only when used

                out[g.name] = (load_verifier(g.verifier), dict(g.router_models))
        return out

    def ledger_stats(self) -> dict[str, float]:
        s = self.writer.stats
        return {"queued": self.writer.queued, "store_up": float(s.store_up), "written": s.written,
                "spooled": s.spooled, "replayed": s.replayed, "recovered": s.recovered}

    async def startup(self) -> None:
        try:
            await self.store.open()
        except Exception as e:
            # The gateway still serves: the writer spools until the store is reachable.
            log.error("ledger store %s unavailable at start-up (%s); spooling", self.cfg.ledger.url, e)
        await self.writer.start()
        for p in self.providers.values():
            await p.start()
        await self.pools.start()
        await self._load_budgets()
        from margin.gateway.reconcile import start_reconciler

        self.reconciler = await start_reconciler(self)
        await self.payloads.start()
        await self.audit.start(self.cfg)  # records this start's configuration and what changed since the last
        self._refresher = asyncio.create_task(self._refresh_budgets(), name="budget-refresh")
        if self.lane is not None:
            await self.lane.start()
        if self.pipeline.semantic is not None:  # loads the embedder (exports ONNX on first use)
            await self.pipeline.semantic.start()
        # Start-up objects (config, the genai-prices snapshot, models) live forever: move them out
        # of the collector's reach so full collections under load stay short (p99).
        gc.collect()
        gc.freeze()

    async def _load_budgets(self) -> None:
        from margin.gateway.budget_admin import reload

        try:
            await reload(self)
            if isinstance(self.guard.state, MemoryState):
                # In-process counters start empty: rebuild this period's spend from the ledger.
                n = await recover_spend(self.store, self.guard)
                log.info("budgets: recovered spend from %d ledger events", n)
        except Exception as e:
            log.error("budgets: could not load stored budgets or recover spend (%s); config budgets only", e)

    async def _refresh_budgets(self) -> None:
        from margin.gateway.budget_admin import reload

        while True:
            await asyncio.sleep(self.cfg.budget_refresh_s)
            try:
                await reload(self)
            except Exception as e:  # store down: keep the definitions we have
                log.debug("budget refresh failed: %s", e)

    async def shutdown(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
        if self.reconciler is not None:
            await self.reconciler.close()
        await self.payloads.close()
        await self.audit.close()
        if self.lane is not None:  # before the writer and providers close: running items finish first
            await self.lane.stop()
        if self.pipeline.semantic is not None:
            await self.pipeline.semantic.close()
        await self.guard.close()
        await self.writer.close()
        await self.pools.close()
        for p in self.providers.values():
            await p.close()
        await self.store.close()
        self.telemetry.shutdown()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as e:
                    await send({"type": "lifespan.startup.failed", "message": str(e)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        method: str = scope["method"]
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        out = AsgiOut(send, receive)
        endpoint = ENDPOINTS.get(path.removesuffix("/"))
        try:
            if endpoint is not None:
                if method != "POST":
                    raise MethodNotAllowed(f"{path} takes POST, not {method}")
                try:
                    body = await read_body(receive, headers, self.max_body)
                except PayloadTooLarge as e:
                    # Oversize bodies are refused before parsing, but still metered.
                    await self.pipeline.refuse(endpoint, headers, e, out)
                    return
                await self.pipeline.handle(endpoint, headers, body, out)
                await out.finish()
                return
            if path.startswith(BATCH_PREFIXES):  # the batch lane (issue 5); needs the query string
                status, hdrs, payload = await handle_batches(self, method, path, scope, headers, receive)
            elif path == "/ui" or path.startswith("/ui/"):  # the dashboard (issue 9); changes go through admin
                from margin.ui.web import handle as handle_ui

                body = await read_body(receive, headers, self.max_body) if method == "POST" else b""
                audit.via_dashboard(scope)  # admin changes made by this request are the dashboard's (audit log)
                status, hdrs, payload = await handle_ui(self, admin.handle, method, path, scope, headers, body)
            else:
                status, hdrs, payload = await self._other(method, path, headers, receive, scope)
            await out.respond(status, hdrs, payload)
        except GatewayError as e:
            await out.respond(e.status, JSON_HEADERS, e.body())
        except ConnectionAbortedError:
            return

    async def _other(self, method: str, path: str, headers: dict[str, str],
                     receive: Receive, scope: Scope | None = None) -> tuple[int, Headers, bytes]:
        if path == "/health":
            return 200, JSON_HEADERS, orjson.dumps({"status": "ok", "ledger": self.ledger_stats(),
                                                    "providers": sorted(self.providers),
                                                    "circuits": self.breakers.snapshot(),
                                                    **({"budget_state": self.reconciler.stats()}
                                                       if self.reconciler is not None else {}),
                                                    **({"semantic_cache": self.pipeline.semantic.health()}
                                                       if self.pipeline.semantic is not None else {})})
        if path == "/openapi.json":
            from margin.gateway.openapi import document_bytes

            return 200, JSON_HEADERS, document_bytes()
        if path == "/metrics":
            return 200, [(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")], self.telemetry.render()
        if path.removesuffix("/") in ("/v1/models", "/models"):
            key = await self.keys.authenticate(headers.get("authorization"))
            data = [{"id": m.name, "object": "model", "created": 0, "owned_by": m.provider}
                    for m in self.cfg.models if not key.models or m.name in key.models]
            data += [{"id": g.name, "object": "model", "created": 0, "owned_by": "margin"} for g in self.cfg.groups]
            return 200, JSON_HEADERS, orjson.dumps({"object": "list", "data": data})
        if path.removesuffix("/") in ("/v1/outcomes", "/outcomes"):
            if method != "POST":
                raise MethodNotAllowed(f"{path} takes POST, not {method}")
            from margin.gateway import outcomes

            return await outcomes.handle(self, headers, await read_body(receive, headers, self.max_body))
        if path.startswith("/admin/"):
            body = await read_body(receive, headers, self.max_body) if method in ("POST", "PUT", "PATCH") else b""
            return await admin.handle(self, method, path, headers, body, scope)  # scope: client address, query
        raise NotFound(f"Unknown path {path}", code="unknown_url")



def from_env() -> MarginApp:
    """Factory for ASGI servers started by import path (`margin.gateway.app:from_env`), reading
    the config named by MARGIN_CONFIG."""
    import os

    from margin.config import load_config

    return MarginApp(load_config(os.environ.get("MARGIN_CONFIG", "margin.yaml")))
