"""The only place that sequences a call (see docs/architecture.md): authenticate, route, send,
meter. Every outcome, refused and failed ones included, becomes exactly one ledger event."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import orjson
import uuid_utils

from margin.config import CacheConfig, CompressConfig, RetryConfig
from margin.domain import Attribution, Call, Endpoint, Event, RouteDecision, Usage, VirtualKey, usd
from margin.gateway import calls, levers
from margin.gateway.auth import KeyRing, RevokedKey, require_caller
from margin.gateway.budgets import Admission, BudgetGuard
from margin.gateway.caching import CacheLever
from margin.gateway.compression import CompressLever
from margin.gateway.errors import GatewayError, ServerError, UpstreamFailed
from margin.gateway.health import Breakers
from margin.gateway.payloads import PayloadLog
from margin.gateway.request import MAX_TOKENS_FIELD, build_call, parse_json
from margin.gateway.routing import Router
from margin.gateway.sidecalls import Escalate, SideCalls
from margin.gateway.stream import UPSTREAM_ERRORS, Out, Recorder, Relayed, Sink, relay
from margin.ledger.writer import LedgerWriter
from margin.policy import agents, cascade, route
from margin.pricing import PriceBook
from margin.providers.base import Chunk, Provider
from margin.state.cache import Cache
from margin.telemetry import Telemetry

log = logging.getLogger("margin.gateway")
Headers = list[tuple[bytes, bytes]]
JSON_HEADERS: Headers = [(b"content-type", b"application/json")]
SSE_HEADERS: Headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]


def _now() -> datetime:
    return datetime.now(UTC)


def _ms(t0: float, t1: float) -> float:
    return round((t1 - t0) * 1000, 3)


class Pipeline:
    lane: Any = None  # the batch lane (gateway/batch_worker.BatchLane) when enabled: takes deferrals
    semantic: Any = None  # the semantic cache (gateway/semantic.SemanticLever) when a route opted in
    payloads: PayloadLog | None = None  # prompts and answers of keys that opted in (gateway/payloads.py)

    def __init__(self, targets: dict[str, route.Target], providers: dict[str, Provider], prices: PriceBook,
                 keys: KeyRing, writer: LedgerWriter, telemetry: Telemetry, guard: BudgetGuard,
                 groups: dict[str, route.Group] | None = None, retry: RetryConfig | None = None,
                 breakers: Breakers | None = None, routers: dict[str, tuple[Any, dict[str, str]]] | None = None,
                 cache: Cache | None = None, cache_cfg: CacheConfig | None = None,
                 compression: dict[str, CompressConfig] | None = None,
                 verifiers: dict[str, tuple[Any, dict[str, str]]] | None = None):
        self.caching = CacheLever(cache, cache_cfg, prices, telemetry)
        self.side = SideCalls(targets, self._attempt, self._follow_up, verifiers)
        self.compression = CompressLever(compression or {}, prices, self.side.summarise)
        self.references = {g.name: route.reference(g, targets) for g in (groups or {}).values()}
        self.guard = guard
        self.groups = groups or {}
        self.retry = retry or RetryConfig()
        self.breakers = breakers or Breakers()
        self.router = Router(targets, self.groups, self.breakers, routers or {})
        self.targets = targets
        self.providers = providers
        self.prices = prices
        self.keys = keys
        self.writer = writer
        self.telemetry = telemetry

    def _record(self, ev: Event, t0: float, upstream_s: float | None = None) -> None:
        ev.ts_end = _now()
        ev.latency_ms = _ms(t0, time.perf_counter())
        self.router.observe(ev)
        levers.account_route(ev, self.prices, self.references.get(ev.requested_model))
        self.writer.append(ev)
        self.telemetry.observe(ev, upstream_s)

    @staticmethod
    def _new_event(endpoint: Endpoint, headers: dict[str, str]) -> Event:
        now = _now()
        return Event(event_id=str(uuid_utils.uuid7()), ts_start=now, ts_end=now,
                     request_id=headers.get("x-request-id") or uuid_utils.uuid4().hex,
                     endpoint=endpoint, attribution=Attribution(), requested_model="")

    async def refuse(self, endpoint: Endpoint, headers: dict[str, str], error: GatewayError, out: Out) -> None:
        """Meter and answer a request refused before its body could be read (e.g. too large)."""
        t0 = time.perf_counter()
        ev = self._new_event(endpoint, headers)
        with contextlib.suppress(GatewayError):  # unattributed if the key is bad, but still recorded
            ev.attribution = (await self.keys.authenticate(headers.get("authorization"))).attribution()
        ev.status, ev.error_type = error.status, error.code or error.type
        self._record(ev, t0)
        await out.respond(error.status, JSON_HEADERS, error.body())

    async def handle(self, endpoint: Endpoint, headers: dict[str, str], body: bytes, out: Out,
                     key: VirtualKey | None = None, event_id: str | None = None) -> None:
        """One ledger event per attempt, whatever happens (errors, cancellation, bugs); retries and
        fallbacks are events of their own, linked to the first by parent_event_id.

        `key`: an already-authenticated caller (the batch lane runs stored requests on behalf of
        the key that submitted them; only the hash of its secret is stored, so it cannot re-send it).
        Its revocation is still honoured: the key is re-read through the key ring. `event_id`: a
        deterministic id for the first attempt's event, so an internal caller that must re-run a
        request after a crash cannot record it twice (the ledger ignores a repeated event_id)."""
        t0 = time.perf_counter()
        ev = self._new_event(endpoint, headers)
        if event_id is not None:
            ev.event_id = event_id
        failure: GatewayError | None = None
        handed_off = False  # once attempts start, each records its own event
        try:
            key = require_caller(await self.keys.by_id(key.key_id) if key is not None
                                 else await self.keys.authenticate(headers.get("authorization")))
            ev.attribution = key.attribution()
            payload = parse_json(body)
            ev.requested_model = str(payload.get("model") or "")
            call = build_call(endpoint, payload, headers, key)
            ev.attribution, ev.stream = call.attribution, call.stream
            ev.run_id, ev.workflow, ev.agent, ev.step, ev.tool = (
                call.run_id, call.workflow, call.agent, call.step, call.tool)
            ev.tier = call.tier
            # Batch lane (issue 5): a low-priority request may be queued for later (202 + job id).
            if self.lane is not None and event_id is None and await self.lane.maybe_defer(
                    endpoint, headers, body, key, call, ev, out):
                return
            decision = self.router.decide(call, payload, key.models)
            handed_off = True
            # A batch item or deferred job (event_id given) is re-run after a crash under the same
            # id: the lane's own journal covers it, so no provisional in-flight row for it.
            await self._attempts(call, decision, payload, headers, body, ev, t0, out, in_flight=event_id is None)
        except GatewayError as e:
            if isinstance(e, RevokedKey):
                ev.attribution = e.key.attribution()
            if not handed_off:
                ev.status, ev.error_type = e.status, e.code or e.type
            failure = e
        except asyncio.CancelledError:  # server shutdown or client gone: still recorded
            if not handed_off and ev.status == 200:
                ev.status, ev.error_type = 499, "cancelled"
            raise
        except Exception as e:  # a bug must still answer in OpenAI form and be metered
            log.exception("internal error handling %s", ev.request_id)
            failure = ServerError(f"Internal error in margin: {type(e).__name__}: {e}")
            if not handed_off:
                ev.status, ev.error_type = failure.status, "internal_error"
        finally:
            if not handed_off:
                self._record(ev, t0)
        held: tuple[Event, float] | None = getattr(failure, "held_event", None)
        try:
            if failure is not None and not out.started and not out.disconnected:
                # Batch lane (issue 5): a budget's "defer" queues the request (202 + job id) instead of a 429.
                if (held is not None and self.lane is not None and event_id is None
                        and await self.lane.maybe_defer(endpoint, headers, body, key, call, held[0], out, failure)):
                    return
                await out.respond(failure.status, [*JSON_HEADERS, *_h(failure.headers)], failure.body())
        finally:
            if held is not None:  # recorded once its answer is known: 202 if the lane took it, else the 429
                self._record(*held)

    async def _attempts(self, call: Call, decision: RouteDecision, payload: dict[str, Any],
                        headers: dict[str, str], body: bytes, first: Event, t0: float, out: Out,
                        in_flight: bool = True) -> None:
        """The chosen model, retried on transient failures, then its fallbacks in order."""
        group = self.groups.get(call.requested_model)
        cascading = group is not None and group.strategy == "cascade" and not call.stream
        chain = [decision] + [self._fallback(m, decision) for m in decision.fallbacks]
        ev: Event | None = first
        last: UpstreamFailed | None = None
        for i, d in enumerate(chain):
            verify = group if cascading and i < len(chain) - 1 else None  # the last step's answer stands
            for attempt in range(self.retry.attempts):
                if ev is None:
                    ev, t0 = self._follow_up(first), time.perf_counter()
                try:
                    await self._attempt(call, d, payload, headers, body, ev, t0, out, verify, hold_deferral=True,
                                        in_flight=in_flight)
                    return
                except Escalate as e:
                    ev = None
                    if i + 1 < len(chain):
                        chain[i + 1] = dataclasses.replace(
                            chain[i + 1], reason=f"group {call.requested_model}: cascade step {i + 2} ({e})")
                    break
                except UpstreamFailed as e:
                    if out.started or not e.retryable:
                        raise
                    last, ev = e, None
                    wait = calls.backoff_s(self.retry, attempt, e.retry_after_s)
                    if wait is None or d.provider in self.breakers.open_providers():
                        break  # the upstream asks for longer than we wait, or its circuit opened
                    if attempt + 1 < self.retry.attempts:
                        await asyncio.sleep(wait)
        if last is None:  # every cascade step escalated (cannot happen: the last step stands)
            raise ServerError("cascade ended without an answer")
        raise last

    def _fallback(self, model: str, primary: RouteDecision) -> RouteDecision:
        t = self.targets[model]
        return RouteDecision(model=t.model, provider=t.provider, upstream_model=t.upstream_model,
                             reason=f"fallback from {primary.model}")

    def _follow_up(self, first: Event) -> Event:
        ev = self._new_event(first.endpoint, {"x-request-id": first.request_id})  # type: ignore[arg-type]
        ev.parent_event_id = first.event_id
        ev.attribution, ev.requested_model, ev.stream, ev.tier = (
            first.attribution, first.requested_model, first.stream, first.tier)
        ev.run_id, ev.workflow, ev.agent, ev.step, ev.tool = (
            first.run_id, first.workflow, first.agent, first.step, first.tool)
        return ev

    async def _attempt(self, call: Call, decision: RouteDecision, payload: dict[str, Any],
                       headers: dict[str, str], body: bytes, ev: Event, t0: float, out: Out,
                       verify: route.Group | None = None, hold_deferral: bool = False,
                       in_flight: bool = True) -> None:
        """One call to one model. `hold_deferral`: a budget's defer refusal leaves its event for
        handle() to record once the batch lane has answered (side calls record their own).
        `in_flight`: journal a provisional row in case the process dies during the call."""
        admission: Admission | None = None
        upstream_s: float | None = None
        held = False
        ev.model, ev.provider, ev.route_reason = decision.model, decision.provider, decision.reason
        try:
            message = agents.message_hash(call.endpoint, payload) if call.run_id and self.guard.run_caps else ""
            admission = await self.guard.admit(call, decision, len(body), calls.turns(call.endpoint, payload), ev,
                                               message)
            upstream_payload = dict(payload)
            if admission is not None:
                decision = self._apply_budget(admission, decision, call.endpoint, upstream_payload)
                ev.model, ev.provider, ev.route_reason = decision.model, decision.provider, decision.reason
            upstream_payload["model"] = decision.upstream_model
            key, may_read, may_write = self.caching.plan(call, decision, payload, headers)
            if key and may_read and await self.caching.serve(key, call, decision, ev, out,
                                                             calls.route_headers(ev, decision)):
                return
            store = key if may_write and verify is None else None
            # Semantic cache (gateway/semantic.py): after an exact miss, a paraphrase may be answered.
            sem = self.semantic.plan(call, decision, payload, headers) if self.semantic is not None else None
            if sem is not None and await self.semantic.serve(sem, call, decision, ev, out,
                                                             calls.route_headers(ev, decision)):
                return
            sem = sem if verify is None else None  # like `store`: only a final answer is remembered
            if call.endpoint == "chat" and call.requested_model in self.compression.routes:
                await self.compression.apply(call, decision, payload, upstream_payload, ev)
            self.breakers.before_call(decision.provider)
            if in_flight:
                self.writer.begin(calls.lost_call(ev, call.endpoint, decision.model, payload, self.prices))
            if call.stream:
                upstream_s = await self._stream(call, decision, payload, upstream_payload, headers, ev, t0, out,
                                                store, sem)
            else:
                upstream_s = await self._complete(call, decision, payload, upstream_payload, headers, ev, out,
                                                  verify, store, sem)
            self.breakers.success(decision.provider)
        except Escalate:
            self.breakers.success(decision.provider)
            raise
        except GatewayError as e:
            ev.status, ev.error_type = e.status, e.code or e.type
            if isinstance(e, UpstreamFailed) and e.provider_fault:
                self.breakers.failure(decision.provider)
            if hold_deferral and e.code == "budget_deferred":  # handle() records it, 202 or 429
                e.held_event, held = (ev, t0), True  # type: ignore[attr-defined]
            raise
        except asyncio.CancelledError:
            if ev.status == 200:
                ev.status, ev.error_type = 499, "cancelled"
            raise
        except Exception:
            ev.status, ev.error_type = 500, "internal_error"
            raise
        finally:
            if not held:
                self._record(ev, t0, upstream_s)
            if admission is not None:
                await self.guard.settle(admission, ev)

    def _apply_budget(self, adm: Admission, decision: RouteDecision, endpoint: Endpoint,
                      upstream_payload: dict[str, Any]) -> RouteDecision:
        """A downgrade serves the lighter model; a cap bounds the output so the cost fits."""
        p = adm.plan
        if p.max_tokens is not None:
            upstream_payload[MAX_TOKENS_FIELD.get(endpoint, "max_tokens")] = p.max_tokens
        if p.model == decision.model:
            return decision
        t = self.targets[p.model]
        return RouteDecision(model=t.model, provider=t.provider, upstream_model=t.upstream_model,
                             reason=f"budget downgrade from {p.downgraded_from}", downgraded_from=p.downgraded_from)

    def _meter(self, ev: Event, decision: RouteDecision, usage: Usage) -> None:
        ev.usage = usage
        ev.cost = self.prices.cost(decision.model, usage)
        ev.energy_j = self.prices.energy(decision.model, usage)

    async def _complete(self, call: Call, decision: RouteDecision, payload: dict[str, Any],
                        upstream_payload: dict[str, Any], headers: dict[str, str], ev: Event, out: Out,
                        verify: route.Group | None = None, store: str | None = None, sem: Any = None) -> float:
        provider = self.providers[decision.provider]
        added = verify is not None and verify.verify_min_logprob is not None and cascade.ask_logprobs(
            call.endpoint, upstream_payload)
        t_up = time.perf_counter()
        try:
            reply = await provider.send(call.endpoint, upstream_payload, headers)
        except UPSTREAM_ERRORS as e:
            raise calls.upstream_error(e) from None
        if reply.meta:  # a self-hosted pool says which replica served it, and why
            ev.actions.append(reply.meta)
        upstream_s = time.perf_counter() - t_up
        usage = calls.answered_usage(call.endpoint, payload, reply.data)
        self._meter(ev, decision, usage)
        ev.tool_calls = calls.tool_calls_in(reply.data)
        body = reply.body
        if verify is not None:
            await self.side.verify(verify, call, payload, reply.data, ev)
            if added:  # asked for only to verify: the client gets the answer it asked for
                body = orjson.dumps(cascade.without_logprobs(reply.data))
        response_headers = [*JSON_HEADERS, *calls.route_headers(ev, decision),
                            (b"x-margin-cost-usd", usd(ev.cost.total_usd).encode())]
        await out.respond(200, response_headers, body)
        if self.payloads is not None:  # opted-in keys only; redacted off the request path
            self.payloads.capture(call, ev.event_id, payload, calls.output_text(reply.data))
        if store:
            await self.caching.put(store, decision, ev, body=reply.body.decode(errors="replace"))
        if sem is not None:  # semantic cache: remember the answer for paraphrases
            await self.semantic.put(sem, decision, ev, body=reply.body.decode(errors="replace"))
        return upstream_s

    async def _stream(self, call: Call, decision: RouteDecision, payload: dict[str, Any],
                      upstream_payload: dict[str, Any], headers: dict[str, str], ev: Event, t0: float,
                      out: Out, store: str | None = None, sem: Any = None) -> float:
        provider = self.providers[decision.provider]
        opts = payload.get("stream_options")
        # A Responses stream always ends with its usage; chat/completion streams only when asked, so
        # margin always asks (the stream is metered exactly) and hides it if the client did not.
        client_wants_usage = call.endpoint == "response" or (isinstance(opts, dict)
                                                             and opts.get("include_usage") is True)
        if call.endpoint != "response":
            upstream_payload["stream_options"] = {**(opts if isinstance(opts, dict) else {}), "include_usage": True}
        chunks: AsyncIterator[Chunk] = provider.stream(call.endpoint, upstream_payload, headers)
        t_up = time.perf_counter()
        try:
            first = await anext(chunks)
        except StopAsyncIteration:
            raise UpstreamFailed("Upstream closed the stream without sending anything",
                                 code="upstream_connection_error") from None
        except UPSTREAM_ERRORS as e:
            raise calls.upstream_error(e) from None
        if first.meta:
            ev.actions.append(first.meta)
        await out.start(200, [*SSE_HEADERS, *calls.route_headers(ev, decision)])

        async def on_done(r: Relayed) -> bytes:  # just before [DONE]: tell the client the cost
            self._meter(ev, decision, r.usage or calls.streamed_usage(call.endpoint, payload, r))
            return f": margin cost_usd={usd(ev.cost.total_usd)} event_id={ev.event_id}\n\n".encode()

        sink: Sink = Recorder(out) if store or sem is not None else out
        r = await relay(chunks, first, sink, client_wants_usage, on_done)
        if r.client_left:
            ev.status, ev.error_type = 499, "client_disconnected"
        elif r.failure is not None:
            err = (calls.upstream_error(r.failure) if isinstance(r.failure, UPSTREAM_ERRORS)
                   else ServerError(f"Internal error in margin: {type(r.failure).__name__}: {r.failure}"))
            ev.status, ev.error_type = err.status, err.code or "upstream_error"
            if not out.disconnected:
                await out.chunk(err.stream_event(call.endpoint))
        elif r.upstream_error_event:
            ev.status, ev.error_type = 502, "upstream_error"
        ev.tool_calls = r.tool_calls
        if self.payloads is not None:
            self.payloads.capture(call, ev.event_id, payload, "".join(r.pieces))
        # Provider-reported usage wins whenever it arrived; otherwise bill what was delivered.
        self._meter(ev, decision, r.usage or calls.streamed_usage(call.endpoint, payload, r))
        if store and isinstance(sink, Recorder) and ev.status == 200 and r.usage is not None:
            await self.caching.put(store, decision, ev, chunks=sink.events)
        if sem is not None and isinstance(sink, Recorder) and ev.status == 200 and r.usage is not None:
            await self.semantic.put(sem, decision, ev, chunks=sink.events)  # semantic cache
        if r.t_first:
            ev.ttft_ms = _ms(t0, r.t_first)
            if r.n_out > 1:
                ev.tpot_ms = round((r.t_last - r.t_first) * 1000 / (r.n_out - 1), 3)
        return time.perf_counter() - t_up


def _h(headers: dict[str, str]) -> Headers:
    return [(k.lower().encode(), v.encode()) for k, v in headers.items()]

