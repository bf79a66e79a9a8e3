"""Open-loop HTTP load generator (one process, asyncio + uvloop + aiohttp).

Requests are *scheduled* at fixed intervals of 1/RPS, whether or not earlier ones have finished,
and each request's latency is measured from its scheduled send time to the end of its response
body. A slow target therefore shows up as queueing latency instead of silently lowering the
offered load (no coordinated omission, as in wrk2).

Kept deliberately lean because it shares a 2-core machine with the systems under test: the body
is serialised once, responses are not parsed (status and length only), GC is off while running.

    python bench/loadgen.py --url http://127.0.0.1:8000/v1/chat/completions --rps 500 \
        --duration 10 --warmup 2 --body-file body.json --header 'authorization: Bearer mk-...' \
        --out result.json

The result JSON holds counters, timing and the raw latencies (ms) of the measured requests;
requests scheduled during the warm-up are sent but not recorded.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import resource
import sys
import time
from array import array
from pathlib import Path
from typing import Any

import aiohttp
import uvloop  # a margin dependency


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True)
    p.add_argument("--rps", type=float, required=True, help="scheduled requests per second")
    p.add_argument("--duration", type=float, required=True, help="measured seconds (after warm-up)")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of unrecorded load first")
    p.add_argument("--body-file", type=Path, required=True, help="request body, sent verbatim")
    p.add_argument("--header", action="append", default=[], help="'name: value', repeatable")
    p.add_argument("--timeout", type=float, default=10.0, help="per-request total timeout, s")
    p.add_argument("--connections", type=int, default=2048, help="connection pool limit")
    p.add_argument("--out", type=Path, required=True, help="where to write the result JSON")
    return p.parse_args(argv)


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    body = args.body_file.read_bytes()
    headers = {"content-type": "application/json"}
    for h in args.header:
        name, _, value = h.partition(":")
        headers[name.strip()] = value.strip()

    rps = float(args.rps)
    interval = 1.0 / rps
    n_warm = round(args.warmup * rps)
    n_meas = round(args.duration * rps)
    total = n_warm + n_meas

    lat_ms = array("d", [math.nan]) * n_meas  # scheduled start -> response fully read
    lag_ms = array("d", [math.nan]) * n_meas  # scheduled start -> request handed to aiohttp
    ends = array("d", [math.nan]) * n_meas
    status = array("i", [0]) * n_meas
    resp_bytes = 0
    error_kinds: dict[str, int] = {}

    loop = asyncio.get_running_loop()
    now = time.perf_counter  # uvloop's loop.time() only has millisecond resolution
    url = args.url
    connector = aiohttp.TCPConnector(
        limit=args.connections, limit_per_host=0, keepalive_timeout=60.0, ttl_dns_cache=None
    )
    timeout = aiohttp.ClientTimeout(total=args.timeout)

    async with aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        headers=headers,
        skip_auto_headers=("User-Agent",),
        auto_decompress=False,
        raise_for_status=False,
    ) as session:

        async def one(idx: int, sched: float) -> None:
            nonlocal resp_bytes
            m = idx - n_warm
            sent = now()
            st = -1
            n = 0
            try:
                async with session.post(url, data=body) as resp:
                    n = len(await resp.read())
                    st = resp.status
            except TimeoutError:
                error_kinds["timeout"] = error_kinds.get("timeout", 0) + 1
            except Exception as e:
                k = type(e).__name__
                error_kinds[k] = error_kinds.get(k, 0) + 1
            end = now()
            if m >= 0:
                lat_ms[m] = (end - sched) * 1000.0
                lag_ms[m] = (sent - sched) * 1000.0
                ends[m] = end
                status[m] = st
                resp_bytes += n

        cpu0 = time.process_time()
        t0 = now() + 0.02
        measure_start = t0 + n_warm * interval
        tasks: set[asyncio.Task[None]] = set()
        i = 0
        # Bounded: exactly `total` requests; each pass launches every request already due.
        while i < total:
            due = min(total, int((now() - t0) * rps) + 1)
            while i < due:
                t = loop.create_task(one(i, t0 + i * interval))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
                i += 1
            if i < total:
                delay = t0 + i * interval - now()
                if delay > 0:
                    await asyncio.sleep(delay)
        schedule_end = now()
        pending = set(tasks)
        if pending:
            _, still = await asyncio.wait(pending, timeout=args.timeout + 2.0)
            for t in still:
                t.cancel()
            if still:
                await asyncio.wait(still, timeout=2.0)
        cpu1 = time.process_time()
        wall_end = now()

    ok = sum(1 for s in status if s == 200)
    non200: dict[str, int] = {}
    for s in status:
        if s not in (200, -1, 0):
            non200[str(s)] = non200.get(str(s), 0) + 1
    exceptions = sum(1 for s in status if s == -1)
    never_finished = sum(1 for s in status if s == 0)  # cancelled at the drain deadline
    ok_ends = [e for e, s in zip(ends, status, strict=True) if s == 200]
    last_end = max(ok_ends) if ok_ends else measure_start + args.duration
    span = max(args.duration, last_end - measure_start)
    lats = [round(x, 3) for x, s in zip(lat_ms, status, strict=True) if s == 200]
    lags = sorted(x for x in lag_ms if not math.isnan(x))
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "url": url,
        "target_rps": rps,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "sent": n_meas,
        "ok": ok,
        "errors": n_meas - ok,
        "non_200": non200,
        "exceptions": exceptions + never_finished,
        "error_kinds": error_kinds,
        "achieved_rps": ok / span if span > 0 else 0.0,
        "span_s": span,
        "schedule_overrun_ms": (schedule_end - (t0 + total * interval)) * 1000.0,
        "send_lag_p99_ms": lags[min(len(lags) - 1, math.ceil(0.99 * len(lags)) - 1)] if lags else None,
        "send_lag_max_ms": lags[-1] if lags else None,
        "loadgen_cpu_s": cpu1 - cpu0,
        "loadgen_wall_s": wall_end - t0,
        "loadgen_maxrss_kb": ru.ru_maxrss,
        "response_bytes": resp_bytes,
        "latencies_ms": lats,
    }


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if args.rps <= 0 or args.duration <= 0:
        print("--rps and --duration must be > 0", file=sys.stderr)
        return 2
    gc.collect()
    gc.freeze()
    gc.disable()
    result = uvloop.run(_run(args))
    gc.enable()
    args.out.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
