"""A self-hosted pool (vLLM, Triton, TGI, llama.cpp server): several OpenAI-compatible replicas
behind one provider name. Each replica's own metrics are scraped in the background; every request
goes to the replica `policy.balance.choose` picks (least-loaded, with prefix affinity), so the
pipeline is unchanged: it calls one provider, the pool chooses inside.

The choice travels back on the reply (`Reply.meta`, or the first `Chunk.meta` of a stream) as the
ledger action `{"action": "replica", "pool", "replica", "why"}`. A replica that refuses the
connection (nothing was sent) is marked down and the next one is tried at once."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from margin.config import ProviderConfig, ReplicaConfig
from margin.domain import Endpoint
from margin.domain.responses import TERMINAL_EVENTS
from margin.policy.balance import Choice, ReplicaLoad, ReplicaStatus, affinity_key, choose
from margin.providers import with_responses
from margin.providers.base import Chunk, Provider, Reply, UpstreamConnectionError
from margin.providers.openai_http import OpenAIHTTPProvider
from margin.providers.scrape import Scrape, metrics_url, root_url, scrape
from margin.tasks import cancel_and_wait

log = logging.getLogger("margin.pool")
WINDOW_MAX = 20_000  # completed requests remembered per pool for the advice (bounded memory)


@dataclass(frozen=True, slots=True)
class Served:
    """One request a pool completed (for the autoscaling advice's live latency and lengths)."""

    t: float  # monotonic, when it ended
    replica: str
    latency_s: float
    ttft_s: float | None
    tpot_s: float | None
    input_tokens: int | None
    output_tokens: int | None
    ok: bool


@dataclass
class Replica:
    cfg: ReplicaConfig
    http: Provider
    status: ReplicaStatus = "unknown"
    last: Scrape | None = None
    inflight: int = 0
    sent: int = 0  # requests margin started here, ever
    done: int = 0
    failed: int = 0
    sent_mark: int = 0  # `sent` / `done` when the last successful scrape started
    done_mark: int = 0
    down_reason: str = ""
    generated: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=4096))  # (at, tokens counter)

    @property
    def name(self) -> str:
        return self.cfg.label

    def load(self) -> ReplicaLoad:
        s = self.last
        return ReplicaLoad(self.name, self.status, waiting=(s.waiting or 0.0) if s else 0.0,
                           running=(s.running or 0.0) if s else 0.0, kv_usage=s.kv_usage if s else None,
                           sent_since_scrape=self.sent - self.sent_mark, done_since_scrape=self.done - self.done_mark,
                           inflight=self.inflight, slots=s.slots if s else None)


def _refused(e: UpstreamConnectionError) -> bool:
    """openai_http raises `from None`; the aiohttp error is still the exception's context."""
    ctx = e.__context__
    return isinstance(ctx, aiohttp.ClientConnectorError) and not isinstance(ctx, aiohttp.ClientSSLError)


def _same_server(a: str, b: str) -> bool:
    return root_url(a).split("://", 1)[-1].split("/", 1)[0] == root_url(b).split("://", 1)[-1].split("/", 1)[0]


def _usage(data: Mapping[str, Any] | None) -> tuple[int | None, int | None]:
    """(input, output) tokens of a chat answer or chunk, or of a Responses answer or terminal event."""
    if data and isinstance(data.get("response"), dict):  # a Responses stream's terminal event
        data = data["response"]
    u = data.get("usage") if data else None
    if not isinstance(u, dict):
        return None, None
    i = u.get("prompt_tokens", u.get("input_tokens"))
    o = u.get("completion_tokens", u.get("output_tokens"))
    return (i if isinstance(i, int) else None), (o if isinstance(o, int) else None)


def _timings(data: Mapping[str, Any]) -> tuple[float | None, float | None]:
    """llama.cpp's `timings` (server-side prompt ms, ms per generated token), when present."""
    t = data.get("timings")
    if not isinstance(t, dict):
        return None, None
    pm, tpt = t.get("prompt_ms"), t.get("predicted_per_token_ms")
    return (pm / 1000 if isinstance(pm, int | float) else None), (tpt / 1000 if isinstance(tpt, int | float) else None)


@dataclass
class _Window:
    served: deque[Served] = field(default_factory=lambda: deque(maxlen=WINDOW_MAX))
    arrivals: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW_MAX))


class PoolProvider:
    """Provider kinds vllm, triton, tgi and llamacpp-server."""

    def __init__(self, cfg: ProviderConfig):
        self.name, self.cfg = cfg.name, cfg
        self.kind: str = cfg.kind
        self.settings = cfg.pool
        # Each replica is an OpenAI-compatible upstream of its own (pooled connections, streaming, errors).
        self.replicas = [
            Replica(r, with_responses(cfg, OpenAIHTTPProvider(
                cfg.model_copy(update={"kind": "openai", "base_url": r.base_url}))))
            for r in cfg.replica_configs]
        self._by_name = {r.name: r for r in self.replicas}
        self._turn = 0
        self._session: aiohttp.ClientSession | None = None
        self._scraper: asyncio.Task[None] | None = None
        self.window = _Window()
        self.scrapes = 0
        self.started_at: float | None = None  # monotonic
        self.capacity_changed_at = 0.0  # monotonic time a replica last came up

    # -- lifecycle --------------------------------------------------------------------------------
    async def start(self) -> None:
        for r in self.replicas:
            await r.http.start()
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=4 * len(self.replicas) + 4))
        self.started_at = time.monotonic()
        await self.scrape_once()  # a first picture before the first request
        self._scraper = asyncio.create_task(self._scrape_loop(), name=f"pool-scrape-{self.name}")

    async def close(self) -> None:
        await cancel_and_wait(self._scraper)
        self._scraper = None
        if self._session is not None:
            await self._session.close()
            self._session = None
        for r in self.replicas:
            await r.http.close()

    async def _scrape_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.scrape_interval_s)
            try:
                await self.scrape_once()
            except Exception:  # a bug in one scrape must not stop the loop
                log.exception("pool %s: scrape failed", self.name)

    async def scrape_once(self) -> None:
        assert self._session is not None
        marks = [(r.sent, r.done) for r in self.replicas]
        results = await asyncio.gather(*(scrape(self._session, self.kind, r.cfg, self.settings.scrape_timeout_s)
                                         for r in self.replicas))
        self.scrapes += 1
        for r, s, (sent, done) in zip(self.replicas, results, marks, strict=True):
            self._apply(r, s, sent, done)

    def _apply(self, r: Replica, s: Scrape, sent: int, done: int) -> None:
        if s.ok:
            if r.status != "up":
                self.capacity_changed_at = s.at  # a replica (re)joined: latency before it is old news
            r.last, r.status, r.down_reason = s, "up", ""
            if s.generation_tokens is not None:
                if r.generated and s.generation_tokens < r.generated[-1][1]:
                    r.generated.clear()  # the engine restarted: its counter began again
                r.generated.append((s.at, s.generation_tokens))
            r.sent_mark, r.done_mark = sent, done  # what was sent before the scrape is in its numbers
        elif s.refused and _same_server(metrics_url(r.cfg), r.cfg.base_url):
            r.status, r.down_reason = "down", s.error
        else:  # the metrics are unreadable (or served elsewhere and down): load unknown, still serving
            r.status = "unknown"
            r.down_reason = s.error

    # -- choice ---------------------------------------------------------------------------------
    def loads(self) -> list[ReplicaLoad]:
        return [r.load() for r in self.replicas]

    def _choose(self, endpoint: Endpoint, payload: Mapping[str, Any], headers: Mapping[str, str] | None,
                exclude: set[str]) -> tuple[Replica, Choice]:
        run_id = (headers or {}).get("x-margin-run-id")
        key = affinity_key(endpoint, payload, run_id) if self.settings.affinity else None
        loads = [x for x in self.loads() if x.name not in exclude]
        self._turn += 1
        c = choose(loads, strategy=self.settings.strategy, key=key, affinity=self.settings.affinity,
                   slack=self.settings.affinity_slack, turn=self._turn)
        return self._by_name[c.replica], c

    def _action(self, r: Replica, c: Choice, tried: list[str]) -> dict[str, Any]:
        why = c.why + (f"; {', '.join(tried)} refused the connection" if tried else "")
        return {"action": "replica", "pool": self.name, "replica": r.name, "why": why}

    def _mark_down(self, r: Replica, e: Exception) -> None:
        r.status, r.down_reason = "down", str(e)[:200]
        log.warning("pool %s: replica %s refused the connection; marked down", self.name, r.name)

    def _begin(self, r: Replica) -> float:
        r.inflight += 1
        r.sent += 1
        now = time.monotonic()
        self.window.arrivals.append(now)
        return now

    def _end(self, r: Replica, t0: float, ok: bool, ttft: float | None = None, tpot: float | None = None,
             tokens: tuple[int | None, int | None] = (None, None)) -> None:
        r.inflight -= 1
        r.done += 1
        r.failed += 0 if ok else 1
        now = time.monotonic()
        self.window.served.append(Served(now, r.name, now - t0, ttft, tpot, tokens[0], tokens[1], ok))

    # -- Provider protocol --------------------------------------------------------------------------
    async def send(self, endpoint: Endpoint, payload: dict[str, Any],
                   headers: Mapping[str, str] | None = None) -> Reply:
        tried: list[str] = []
        while True:
            r, c = self._choose(endpoint, payload, headers, set(tried))
            t0 = self._begin(r)
            try:
                reply = await r.http.send(endpoint, payload, headers)
            except UpstreamConnectionError as e:
                self._end(r, t0, ok=False)
                if _refused(e):
                    self._mark_down(r, e)
                    tried.append(r.name)
                    if len(tried) < len(self.replicas):
                        continue  # nothing reached that replica: another may serve it now
                raise
            except BaseException:
                self._end(r, t0, ok=False)
                raise
            prompt_s, tpot = _timings(reply.data)
            latency = time.monotonic() - t0
            # Non-streaming: TTFT is the latency minus the generation llama.cpp reports, when it does.
            tokens = _usage(reply.data)
            ttft = None if tpot is None or prompt_s is None else latency - tpot * max(0, (tokens[1] or 1) - 1)
            self._end(r, t0, ok=True, ttft=ttft, tpot=tpot, tokens=tokens)
            return dataclasses.replace(reply, meta=self._action(r, c, tried))

    async def stream(self, endpoint: Endpoint, payload: dict[str, Any],
                     headers: Mapping[str, str] | None = None) -> AsyncIterator[Chunk]:
        tried: list[str] = []
        while True:
            r, c = self._choose(endpoint, payload, headers, set(tried))
            t0 = self._begin(r)
            chunks = r.http.stream(endpoint, payload, headers)
            try:
                first = await anext(chunks)
            except UpstreamConnectionError as e:
                self._end(r, t0, ok=False)
                if _refused(e):
                    self._mark_down(r, e)
                    tried.append(r.name)
                    if len(tried) < len(self.replicas):
                        continue
                raise
            except BaseException:
                self._end(r, t0, ok=False)
                raise
            break
        ok = False
        t_first: float | None = None
        t_last = t0
        n = 0
        tokens: tuple[int | None, int | None] = (None, None)
        try:
            chunk, meta = first, self._action(r, c, tried)
            while True:
                if chunk.data is not None:
                    if chunk.data.get("usage") or chunk.data.get("type") in TERMINAL_EVENTS:
                        tokens = _usage(chunk.data)
                    if chunk.data.get("choices") or chunk.data.get("type") == "response.output_text.delta":
                        t_last = time.monotonic()
                        t_first = t_first if t_first is not None else t_last
                        n += 1
                yield dataclasses.replace(chunk, meta=meta) if chunk is first else chunk
                if chunk.data is None:  # [DONE]
                    ok = True
                    break
                try:
                    chunk = await anext(chunks)
                except StopAsyncIteration:
                    ok = True
                    break
        finally:
            ttft = t_first - t0 if t_first is not None else None
            tpot = (t_last - t_first) / (n - 1) if t_first is not None and n > 1 else None
            self._end(r, t0, ok=ok, ttft=ttft, tpot=tpot, tokens=tokens)
            with contextlib.suppress(Exception):
                await chunks.aclose()  # type: ignore[attr-defined]

    # -- views ----------------------------------------------------------------------------------------
    def generation_tps(self, since: float) -> float | None:
        """Tokens/s the replicas generated since `since` (monotonic), from their own counters:
        every client's traffic, not only margin's. None when no replica exposes the counter."""
        total, known = 0.0, False
        for r in self.replicas:
            pts = [p for p in r.generated if p[0] >= since]
            if len(pts) >= 2 and pts[-1][0] > pts[0][0]:
                total += (pts[-1][1] - pts[0][1]) / (pts[-1][0] - pts[0][0])
                known = True
        return total if known else None

    def replica_view(self, now: float | None = None) -> list[dict[str, Any]]:
        now = time.monotonic() if now is None else now
        out = []
        for r in self.replicas:
            s, ld = r.last, r.load()
            out.append({"name": r.name, "base_url": r.cfg.base_url, "status": r.status, "load": ld.load,
                        "waiting": s.waiting if s else None, "running": s.running if s else None,
                        "kv_usage": s.kv_usage if s else None, "slots": s.slots if s else None,
                        "busy_slots": s.busy_slots if s else None, "inflight": r.inflight, "sent": r.sent,
                        "failed": r.failed, "scrape_age_s": round(now - s.at, 3) if s else None,
                        "error": r.down_reason or None})
        return out
