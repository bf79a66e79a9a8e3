"""Open-loop load for the cluster: request i is sent at t0 + i/RPS whether or not earlier ones
finished (no coordinated omission), and its latency runs from that scheduled time to the last
byte. Streams count as complete only if `data: [DONE]` arrived. Bounded: exactly rps x duration
requests, each with a timeout, then it stops by itself.

Every request carries `X-Request-Id: <run prefix>-<i>`, so the ledger can be counted against
what was sent: one event per request (no retries in a healthy run), none missing, none twice."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson


@dataclass(frozen=True)
class Req:
    url: str
    body: bytes
    headers: dict[str, str]
    stream: bool = False
    label: str = "cluster"  # results are summarised per label (e.g. cluster vs direct baseline)


@dataclass
class Result:
    label: str
    request_id: str
    sched: float  # seconds after t0
    latency_ms: float = math.nan
    status: int = 0  # 0: no answer (exception or timeout)
    error: str = ""  # exception type, or the error code of a JSON error body
    complete: bool = True  # a stream that ended with [DONE]
    body: bytes = b""  # kept for non-200 answers only


@dataclass
class Run:
    prefix: str
    rps: float
    duration_s: float
    results: list[Result] = field(default_factory=list)
    wall_s: float = 0.0

    def of(self, label: str = "cluster") -> list[Result]:
        return [r for r in self.results if r.label == label]

    def summary(self, label: str = "cluster") -> dict[str, Any]:
        rs = self.of(label)
        ok = [r for r in rs if r.status == 200 and r.complete]
        lats = sorted(r.latency_ms for r in ok)
        statuses: dict[str, int] = {}
        for r in rs:
            statuses[str(r.status)] = statuses.get(str(r.status), 0) + 1
        span = max((r.sched + r.latency_ms / 1000 for r in ok), default=self.duration_s)
        return {
            "sent": len(rs), "ok": len(ok), "statuses": statuses,
            "server_errors": sum(1 for r in rs if r.status >= 500),
            "no_answer": sum(1 for r in rs if r.status == 0),
            "incomplete_streams": sum(1 for r in rs if r.status == 200 and not r.complete),
            "achieved_rps": round(len(ok) / max(span, 1e-9), 2),
            "p50_ms": pct(lats, 50), "p90_ms": pct(lats, 90), "p99_ms": pct(lats, 99),
            "max_ms": lats[-1] if lats else None,
        }


def pct(sorted_values: list[float], p: float) -> float | None:
    if not sorted_values:
        return None
    i = min(len(sorted_values) - 1, max(0, math.ceil(p / 100 * len(sorted_values)) - 1))
    return round(sorted_values[i], 3)


async def _one(session: aiohttp.ClientSession, req: Req, res: Result, t_sched: float, timeout_s: float) -> None:
    try:
        async with session.post(req.url, data=req.body, headers=req.headers,
                                timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            res.status = resp.status
            if req.stream and resp.status == 200:
                res.complete = False
                async for line in resp.content:
                    if line.startswith(b"data: [DONE]"):
                        res.complete = True
                    elif line.startswith(b'data: {"error"'):
                        res.error = "stream_error"
            else:
                data = await resp.read()
                if resp.status != 200:
                    res.body = data[:2000]
                    try:
                        res.error = str(orjson.loads(data)["error"].get("code") or "")
                    except (ValueError, KeyError, TypeError, AttributeError):
                        res.error = "non_json_error"
    except TimeoutError:
        res.error = "timeout"
        res.status = res.status if res.status else 0
        res.complete = False
    except (aiohttp.ClientError, OSError) as e:
        res.error = type(e).__name__
        res.complete = False
    res.latency_ms = (time.perf_counter() - t_sched) * 1000


async def run_load(make: Callable[[int, str], Req], rps: float, duration_s: float, prefix: str,
                   timeout_s: float = 30.0, on_tick: Callable[[float], None] | None = None,
                   connections: int = 1024) -> Run:
    """`make(i, request_id)` builds request i. `on_tick(elapsed_s)` is called about every 0.1 s
    (faults are injected from there, from a thread of their own if they block)."""
    run = Run(prefix, rps, duration_s)
    total = round(rps * duration_s)
    interval = 1.0 / rps
    connector = aiohttp.TCPConnector(limit=connections, limit_per_host=0, keepalive_timeout=30)
    async with aiohttp.ClientSession(connector=connector, skip_auto_headers=("User-Agent",)) as session:
        tasks: set[asyncio.Task[None]] = set()
        t0 = time.perf_counter() + 0.05
        next_tick = 0.0
        for i in range(total):
            due = t0 + i * interval
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            elapsed = time.perf_counter() - t0
            if on_tick is not None and elapsed >= next_tick:
                on_tick(elapsed)
                next_tick = elapsed + 0.1
            rid = f"{prefix}-{i}"
            req = make(i, rid)
            res = Result(req.label, rid, i * interval)
            run.results.append(res)
            t = asyncio.create_task(_one(session, req, res, due, timeout_s))
            tasks.add(t)
            t.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.wait(set(tasks), timeout=timeout_s + 5)
        run.wall_s = time.perf_counter() - t0
    return run


def chat_request(base_url: str, key: str, model: str = "gpt-4o-mini", stream: bool = False, max_tokens: int = 16,
                 label: str = "cluster", **headers: str) -> Callable[[int, str], Req]:
    """A factory of identical chat requests (each with its own request id)."""
    body = orjson.dumps({"model": model, "messages": [{"role": "user", "content": "Say hello in five words"}],
                         "max_tokens": max_tokens, "stream": stream})
    url = base_url.rstrip("/") + "/v1/chat/completions"

    def make(i: int, rid: str) -> Req:
        return Req(url, body, {"Authorization": f"Bearer {key}", "Content-Type": "application/json",
                               "X-Request-Id": rid, **headers}, stream, label)

    return make
