"""The batch lane's worker, one per gateway replica, and the deferral of single requests.

Each item runs through the same pipeline as live traffic (key re-read, routing, budgets, rate
limits, cache, metering), as the key that submitted it, with `X-Margin-Tier: batch`.

Exactly once, precisely: an item is claimed under a lease; its run's ledger event id is derived
from (item, committed runs); the run's outcome is committed only once that event is in the
ledger, and only while the lease is still held. So a replica killed mid-run leaves the item to be
re-run under the same event id: the ledger keeps one event and the output file one answer
(the provider may have been called, and may bill, twice)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import time
import uuid
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson

from margin.domain import Call, Endpoint, Event, VirtualKey
from margin.gateway.batch_files import batch_object, new_id, result_files
from margin.gateway.errors import GatewayError
from margin.gateway.stream import Headers
from margin.ledger.jobs import JobStore
from margin.ledger.schema import Row
from margin.ledger.store import StoreUnavailable
from margin.policy import batch as policy

if TYPE_CHECKING:
    from margin.gateway.app import MarginApp
    from margin.gateway.batch_forward import Forwarder

log = logging.getLogger("margin.batch")
_NS = uuid.UUID("6d617267-696e-4261-7463-684c616e6531")  # fixed: event ids must not change across releases
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
EVENT_WAIT_S = 30.0  # commit anyway (and say so) if a run's event never reaches the ledger
_SECRET = ("auth", "key", "token", "secret", "cookie")
JSON: Headers = [(b"content-type", b"application/json")]


def event_id_for(item_id: str, runs: int) -> str:
    return str(uuid.uuid5(_NS, f"{item_id}/{runs}"))


def kept_headers(headers: dict[str, str]) -> dict[str, str]:
    """What a stored request keeps of its headers: margin's and forwarded x-* ones, never credentials."""
    return {k: v for k, v in headers.items() if (k.startswith("x-") or k == "cache-control")
            and not k.startswith("x-stainless-") and not any(s in k for s in _SECRET)}


class CaptureOut:
    """An `Out` that keeps the answer instead of sending it (batch items are never streamed)."""

    def __init__(self) -> None:
        self.disconnected = False
        self.started = False
        self.status = 0
        self.headers: dict[str, str] = {}
        self.parts: list[bytes] = []

    async def respond(self, status: int, headers: Headers, body: bytes) -> None:
        self.status, self.parts = status, [body]
        self.headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in headers}

    async def start(self, status: int, headers: Headers) -> None:
        self.started = True
        await self.respond(status, headers, b"")

    async def chunk(self, data: bytes) -> None:
        self.parts.append(data)

    @property
    def body(self) -> bytes:
        return b"".join(self.parts)


@dataclass(slots=True)
class _Ran:
    """A finished run waiting for its ledger event before its outcome is committed."""

    item_id: str
    fields: Row
    event_id: str
    since: float


def error_code(body: bytes) -> tuple[str, str]:
    try:
        err = orjson.loads(body).get("error") or {}
        return str(err.get("code") or err.get("type") or ""), str(err.get("message") or "")
    except (orjson.JSONDecodeError, AttributeError):
        return "", ""


def json_text(body: bytes) -> str:
    """The answer as JSON text (an upstream's non-JSON body is kept as a JSON string)."""
    try:
        orjson.loads(body)
        return body.decode()
    except (orjson.JSONDecodeError, UnicodeDecodeError):
        return orjson.dumps(body.decode(errors="replace")).decode()


class BatchLane:
    def __init__(self, app: MarginApp):
        self.app = app
        self.cfg = app.cfg.batch_lane
        self.jobs = JobStore(app.cfg.ledger.url)
        self.windows = [policy.parse_window(w) for w in self.cfg.windows]
        self.deferred_s = policy.duration_s(self.cfg.deferred_window)
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.opened = False
        self._running: dict[str, asyncio.Task[None]] = {}
        self._ran: dict[str, _Ran] = {}
        self._starts: deque[float] = deque(maxlen=max(1, self.cfg.requests_per_minute))
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._next_house = self._next_renew = 0.0
        self.forwarder: Forwarder | None = None
        if any(p.batch_api for p in app.cfg.providers):
            from margin.gateway.batch_forward import Forwarder

            self.forwarder = Forwarder(self)

    # -- lifecycle --------------------------------------------------------------------------------
    async def ensure_open(self) -> None:
        if not self.opened:
            await self.jobs.open()
            self.opened = True

    async def start(self) -> None:
        with contextlib.suppress(StoreUnavailable):  # the loop keeps trying
            await self.ensure_open()
        self._task = asyncio.create_task(self._loop(), name="batch-lane")

    async def stop(self, grace_s: float = 10.0) -> None:
        """Let running items finish (up to `grace_s`), commit what landed, give back the rest."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            with contextlib.suppress(Exception):
                await self._task
        tasks = list(self._running.values())
        if tasks:
            await asyncio.wait(tasks, timeout=grace_s)
        cut = list(self._running)  # still running: cancelled (their runs record a 499 event)
        pending = [t for t in tasks if not t.done()]
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.wait(pending, timeout=5)
        deadline = time.monotonic() + 5
        with contextlib.suppress(Exception):
            while self._ran and time.monotonic() < deadline:
                await self._commit()
                await asyncio.sleep(0.05)
            # A run that began may have recorded its event: the next run takes a new event id.
            await self.jobs.release(self.owner, [*cut, *self._ran], ran=True)
        if self.forwarder is not None:
            await self.forwarder.close()
        await self.jobs.close()

    def window_open(self, now: float) -> bool:
        return policy.window_open(self.windows, self.cfg.timezone, datetime.fromtimestamp(now, UTC))

    # -- the loop ---------------------------------------------------------------------------------
    async def _loop(self) -> None:
        while not self._stopping:
            try:
                await self.ensure_open()
                await self._tick(time.time())
            except StoreUnavailable as e:
                log.warning("batch lane: store unavailable (%s); retrying", e)
                await asyncio.sleep(self.cfg.poll_interval_s)
            except Exception:
                log.exception("batch lane: unexpected error; continuing")
                await asyncio.sleep(self.cfg.poll_interval_s)
            self._wake.clear()
            # Finished runs are committed as soon as their events land (the ledger writer flushes
            # every few tens of ms), so poll briskly while any wait.
            timeout = 0.02 if self._ran else self.cfg.poll_interval_s
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    async def _tick(self, now: float) -> None:
        await self._commit()
        if now >= self._next_renew:
            self._next_renew = now + self.cfg.lease_s / 3
            await self.jobs.renew(self.owner, [*self._running, *self._ran], now + self.cfg.lease_s)
        if now >= self._next_house:
            self._next_house = now + min(1.0, self.cfg.poll_interval_s)
            await self._housekeeping(now)
        if not self.window_open(now):
            return
        n = policy.claimable(self.cfg.max_concurrency, len(self._running), self.cfg.requests_per_minute,
                             self._starts, now)
        for item in await self.jobs.claim(self.owner, n, now, now + self.cfg.lease_s):
            self._starts.append(now)
            task = asyncio.create_task(self._run(item), name=f"batch-item-{item['item_id']}")
            self._running[item["item_id"]] = task

    async def _housekeeping(self, now: float) -> None:
        await self.jobs.expire_deferred(now)
        batches = await self.jobs.active_batches()
        counts = await self.jobs.item_counts([b["batch_id"] for b in batches])
        for b in batches:
            bid, c = b["batch_id"], counts[b["batch_id"]]
            step = policy.batch_step(b["status"], c, now, float(b["expires_at"]))
            if step == "expire":  # past its window: what has not started never will; running items finish
                if c.get("queued") or c.get("forward"):
                    await self.jobs.expire_queued(bid, now)
                continue
            if step is None:
                continue
            to, stamp = {"complete": ("completed", "completed_at"), "expired": ("expired", "expired_at"),
                         "cancelled": ("cancelled", "cancelled_at")}[step]
            t = int(now)
            if await self.jobs.finalize(bid, b["status"], to, stamp, t, step == "expired",
                                        functools.partial(result_files, now=t)):
                log.info("batch %s %s", bid, to)
        if self.forwarder is not None and self.window_open(now):
            await self.forwarder.tick(now)

    # -- one item ---------------------------------------------------------------------------------
    async def _run(self, item: Row) -> None:
        item_id = item["item_id"]
        try:
            ran = await self._execute(item)
            self._ran[item_id] = ran
        except asyncio.CancelledError:
            raise
        except Exception:  # never lose the item: it stays leased and is taken over when the lease lapses
            log.exception("batch lane: item %s failed inside margin", item_id)
        finally:
            self._running.pop(item_id, None)
            self._wake.set()

    async def _execute(self, item: Row) -> _Ran:
        item_id, runs = item["item_id"], int(item["runs"])
        eid = event_id_for(item_id, runs)
        headers: dict[str, str] = orjson.loads(item["headers"])
        key = VirtualKey(key_id=item["key_id"], key_hash="", prefix="", created_at=_EPOCH)  # re-read by the pipeline
        out = CaptureOut()
        endpoint: Endpoint = item["endpoint"]
        await self.app.pipeline.handle(endpoint, headers, item["body"].encode(), out, key=key, event_id=eid)
        code, message = error_code(out.body) if out.status >= 400 else ("", "")
        now = time.time()
        try:
            retry_after: float | None = float(out.headers.get("retry-after", ""))
        except ValueError:
            retry_after = None
        nxt = policy.after_run(policy.classify(out.status, code), int(item["attempts"]) + 1, self.cfg.max_attempts,
                               now, float(item["expires_at"]), retry_after)
        fields: Row = {"status": nxt.status, "runs": runs + 1,
                       "attempts": int(item["attempts"]) + int(nxt.count_attempt),
                       "error_code": code or None, "error_message": message or None}
        answering = out.headers.get("x-margin-event-id") or eid
        if nxt.status == "queued":
            fields["not_before"] = nxt.not_before
        else:
            fields.update(response_status=out.status, response_body=json_text(out.body), finished_at=now,
                          response_request_id=out.headers.get("x-margin-request-id") or headers.get("x-request-id"),
                          cost_usd=out.headers.get("x-margin-cost-usd"), event_id=answering)
            if nxt.status == "expired":
                fields["error_code"] = "batch_expired" if item["batch_id"] else "deferred_expired"
        return _Ran(item_id, fields, answering, now)

    async def _commit(self) -> None:
        if not self._ran:
            return
        now = time.time()
        present = await self.jobs.events_present([r.event_id for r in self._ran.values()])
        ready = [r for r in self._ran.values() if r.event_id in present or now - r.since > EVENT_WAIT_S]
        if not ready:
            return
        for r in ready:
            if r.event_id not in present:
                log.warning("batch lane: event %s of item %s not in the ledger after %.0f s; committing anyway",
                            r.event_id, r.item_id, now - r.since)
        done = await self.jobs.finish(self.owner, [(r.item_id, r.fields) for r in ready])
        for r in ready:
            self._ran.pop(r.item_id, None)
            if r.item_id not in done:
                log.warning("batch lane: item %s was taken over by another replica; its answer stands", r.item_id)

    # -- deferral of single requests (the hook in Pipeline.handle) --------------------------------
    async def maybe_defer(self, endpoint: Endpoint, headers: dict[str, str], body: bytes, key: VirtualKey,
                          call: Call, ev: Event, out: Any, refusal: GatewayError | None = None) -> bool:
        """Queue the request and answer 202 with a job id, if the lane takes it: a low-priority
        request (outside the window, or always, per config), or one a budget's `defer` refused.
        False: serve or refuse as usual (streaming requests, or the lane's store is down)."""
        now = time.time()
        if call.stream or self._stopping:
            return False
        if refusal is None:
            mode = self.cfg.defer_low_priority
            if call.priority != "low" or mode == "never" or (mode == "outside_window" and self.window_open(now)):
                return False
            reason, not_before = "window", policy.next_open(self.windows, self.cfg.timezone,
                                                             datetime.fromtimestamp(now, UTC)).timestamp()
        else:
            reason, not_before = "budget", now + float(refusal.headers.get("Retry-After", "1"))
        job_id = new_id("job_")
        row: Row = {"item_id": job_id, "batch_id": None, "line": 0, "custom_id": job_id, "key_id": key.key_id,
                    "endpoint": endpoint, "model": call.requested_model, "body": body.decode(),
                    "headers": orjson.dumps({**kept_headers(headers), "x-request-id": ev.request_id}).decode(),
                    "status": "queued", "reason": reason, "attempts": 0, "runs": 0, "not_before": not_before,
                    "expires_at": now + self.deferred_s, "lease_owner": None, "lease_until": None,
                    "event_id": None, "request_id": ev.request_id, "response_status": None,
                    "response_request_id": None, "response_body": None, "error_code": None, "error_message": None,
                    "cost_usd": None, "saved_usd": None, "upstream_id": None, "holds": None, "created_at": now,
                    "finished_at": None}
        try:
            await self.ensure_open()
            await self.jobs.insert_item(row)
        except StoreUnavailable as e:
            log.warning("batch lane: cannot queue a deferred request (%s); answering as usual", e)
            return False
        ev.status, ev.error_type = 202, ""
        if refusal is None:
            ev.actions.append({"action": "defer", "reason": reason, "job_id": job_id})
        else:  # the budget's own "defer" action is on the event already: say where the request went
            for a in reversed(ev.actions):
                if a.get("action") == "defer":
                    a["job_id"] = job_id
                    break
        view = deferred_view(row)
        await out.respond(202, [*JSON, (b"location", view["poll_url"].encode()),
                                (b"retry-after", str(max(1, int(not_before - now))).encode())], orjson.dumps(view))
        self._wake.set()
        return True

    async def batch_view(self, row: Row) -> dict[str, Any]:
        counts = await self.jobs.item_counts([row["batch_id"]])
        return batch_object(row, counts[row["batch_id"]])


def deferred_view(row: Row) -> dict[str, Any]:
    status = row["status"]
    shown = "queued" if status in ("queued", "forward") else "in_progress" if status in ("running", "upstream") \
        else "completed" if status == "done" else status
    return {"id": row["item_id"], "object": "margin.deferred", "status": shown, "reason": row.get("reason"),
            "model": row["model"], "created_at": int(row["created_at"]), "not_before": int(row["not_before"]),
            "expires_at": int(row["expires_at"]), "attempts": int(row["attempts"]),
            "poll_url": f"/v1/deferred/{row['item_id']}"}
