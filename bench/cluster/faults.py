"""The scenarios of issue 10, each a function over a running Cluster that returns its figures and
the checks it passed. tests/test_faults.py runs them short (seconds); bench/soak.py runs them at
full length (PostgreSQL down 60 s, 10 minutes of steady load) and writes BENCHMARKS.md.

Every scenario ends with a count: requests sent against ledger events found (by request id)."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from decimal import Decimal
from typing import Any

import httpx
import orjson
from bench.cluster.cluster import Cluster, ClusterSpec
from bench.cluster.load import Req, Run, chat_request, pct, run_load

# Providers and models of the fault cluster: one healthy upstream and one per kind of fault.
FAULT_MOCKS: dict[str, dict[str, Any]] = {
    "steady": {"output_tokens": 16},
    "slow": {"ttft_ms": 3000.0},
    "failing": {"error_rate": 1.0},
    "resetting": {"reset_rate": 1.0, "output_tokens": 40},
}
_STEADY_HEADERS = ["x-mock-tokens-per-s", "x-mock-output-tokens"]
FAULT_PROVIDERS: list[dict[str, Any]] = [
    {"name": "steady", "mock": "steady", "forward_headers": _STEADY_HEADERS, "timeout_s": 5},
    {"name": "slow", "mock": "slow", "timeout_s": 1},
    {"name": "failing", "mock": "failing"},
    {"name": "resetting", "mock": "resetting"},
    {"name": "garbage", "mock": "steady", "forward_headers": ["x-mock-invalid-json"]},
]


def _pm(inp: str, out: str) -> dict[str, Any]:
    return {"per_million": {"input": inp, "output": out}}


FAULT_MODELS: list[dict[str, Any]] = [
    {"name": "gpt-4o-mini", "provider": "steady", "price": {"genai_prices": "openai/gpt-4o-mini"}},
    {"name": "premium", "provider": "steady", "upstream_model": "gpt-4o", "price": _pm("5", "40")},
    {"name": "backup", "provider": "steady", "upstream_model": "gpt-4o-mini", "price": _pm("0.5", "1")},
    {"name": "slow-model", "provider": "slow", "price": _pm("1", "2"), "fallbacks": ["backup"]},
    {"name": "failing-model", "provider": "failing", "price": _pm("1", "2"), "fallbacks": ["backup"]},
    {"name": "failing-alone", "provider": "failing", "price": _pm("1", "2")},
    {"name": "reset-model", "provider": "resetting", "price": _pm("1", "2")},
    {"name": "garbage-model", "provider": "garbage", "price": _pm("1", "2")},
    {"name": "garbage-fallback", "provider": "garbage", "price": _pm("1", "2"), "fallbacks": ["backup"]},
]


def fault_spec(replicas: int = 3, **kw: Any) -> ClusterSpec:
    config = {
        # Budgets, metering and rate limits on for every call (per key, generous: never the limit here).
        "rate_limits": [{"id": "per-key", "scope": {"key": "*"}, "rpm": 1_000_000, "tpm": 1_000_000_000}],
        "budgets": [{"id": "per-team", "scope": {"team": "*"}, "limit_usd": 100000, "period": "month"}],
        **kw.pop("config", {}),
    }
    return ClusterSpec(replicas=replicas, mocks=dict(FAULT_MOCKS), providers=list(FAULT_PROVIDERS),
                       models=list(FAULT_MODELS), config=config, **kw)


def _prefix(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


def ledger_check(c: Cluster, run: Run, label: str = "cluster", answered_only: bool = False) -> dict[str, int]:
    """Events per request of the run: every request (or every answered one) exactly once."""
    c.wait_ledger_idle(180)
    counts = c.ledger_counts(run.prefix + "-")
    sent = [r for r in run.results if r.label.startswith(label)]
    expect = [r for r in sent if (r.status == 200 or not answered_only) and r.status != 0]
    lost = sum(1 for r in expect if counts.get(r.request_id, 0) == 0)
    dup = sum(n - 1 for n in counts.values() if n > 1)
    return {"expected": len(expect), "found": sum(1 for r in expect if counts.get(r.request_id)), "lost": lost,
            "duplicated": dup}


def _sampler(c: Cluster, every_s: float, out: list[tuple[float, list[int]]], stop: threading.Event) -> None:
    t0 = time.monotonic()
    while not stop.is_set():
        out.append((time.monotonic() - t0, c.rss_kb()))
        stop.wait(every_s)


# -- steady load --------------------------------------------------------------------------------
def steady(c: Cluster, rps: float, duration_s: float, warmup_s: float, stream_every: int = 5,
           direct_every: int = 10, rss_every_s: float = 5.0) -> dict[str, Any]:
    """Open-loop load through nginx across the replicas, budgets/metering/rate limits on; every
    `direct_every`-th request goes straight to the mock (the baseline for added latency)."""
    keys = [c.create_key(team=f"team-{i % 4}", user=f"user-{i}")["key"] for i in range(8)]
    mock_url = c.mocks["steady"][1].removesuffix("/v1")
    plain = [chat_request(c.url, k) for k in keys]
    streams = [chat_request(c.url, k, stream=True, label="cluster-stream") for k in keys]
    direct = chat_request(mock_url, "sk-mock", label="direct")

    def make(i: int, rid: str) -> Req:
        if direct_every and i % direct_every == 0:
            return direct(i, rid)
        k = i % len(keys)
        return streams[k](i, rid) if stream_every and i % stream_every == 1 else plain[k](i, rid)

    samples: list[tuple[float, list[int]]] = []
    stop = threading.Event()
    th = threading.Thread(target=_sampler, args=(c, rss_every_s, samples, stop), daemon=True)
    th.start()
    try:
        run = asyncio.run(run_load(make, rps, warmup_s + duration_s, _prefix("steady")))
    finally:
        stop.set()
        th.join()
    measured = [r for r in run.results if r.sched >= warmup_s]
    cl = sorted(r.latency_ms for r in measured if r.label == "cluster" and r.status == 200)
    dl = sorted(r.latency_ms for r in measured if r.label == "direct" and r.status == 200)
    after = [s for s in samples if s[0] >= warmup_s] or samples
    growth = [round(100.0 * (after[-1][1][i] - after[0][1][i]) / max(1, after[0][1][i]), 2)
              for i in range(len(c.replicas))]
    through = [r for r in measured if r.label.startswith("cluster")]
    server_errors = sum(1 for r in through if r.status >= 500 or r.status == 0)
    span = max((r.sched for r in through), default=1.0) - warmup_s
    ledger = ledger_check(c, run)
    p50c, p99c, p50d, p99d = pct(cl, 50), pct(cl, 99), pct(dl, 50), pct(dl, 99)
    return {
        "rps": rps, "duration_s": duration_s, "warmup_s": warmup_s, "replicas": len(c.replicas),
        "sent": len(through), "server_errors": server_errors,
        "scheduled_rps": round(rps * (1 - (1 / direct_every if direct_every else 0)), 1),
        "incomplete_streams": sum(1 for r in through if r.status == 200 and not r.complete),
        "achieved_rps": round(sum(1 for r in through if r.status == 200) / max(span, 1e-9), 1),
        "p50_ms": p50c, "p99_ms": p99c, "direct_p50_ms": p50d, "direct_p99_ms": p99d,
        "added_p50_ms": round(p50c - p50d, 3) if p50c is not None and p50d is not None else None,
        "added_p99_ms": round(p99c - p99d, 3) if p99c is not None and p99d is not None else None,
        "rss_kb_after_warmup": after[0][1] if after else [], "rss_kb_end": after[-1][1] if after else [],
        "rss_growth_pct": growth, "ledger": ledger,
        "statuses": run.summary("cluster")["statuses"],
    }


# -- PostgreSQL down mid-load -------------------------------------------------------------------
def postgres_outage(c: Cluster, rps: float, duration_s: float, down_at_s: float, down_s: float) -> dict[str, Any]:
    assert c.pg is not None, "needs the cluster's private PostgreSQL"
    pg = c.pg
    key = c.create_key(team="pg-outage")["key"]
    fired = threading.Event()
    timeline: dict[str, float] = {}

    def outage() -> None:
        timeline["down"] = time.monotonic()
        pg.crash()
        time.sleep(down_s)
        pg.start()
        timeline["up"] = time.monotonic()

    def tick(elapsed: float) -> None:
        if elapsed >= down_at_s and not fired.is_set():
            fired.set()
            threading.Thread(target=outage, daemon=True).start()

    run = asyncio.run(run_load(chat_request(c.url, key), rps, duration_s, _prefix("pg"), on_tick=tick))
    deadline = time.monotonic() + down_s + 60
    while "up" not in timeline and time.monotonic() < deadline:
        time.sleep(0.2)
    s = run.summary()
    spooled = sum(r.health()["ledger"]["spooled"] for r in c.replicas)
    return {"rps": rps, "duration_s": duration_s, "down_s": down_s, "sent": s["sent"], "ok": s["ok"],
            "statuses": s["statuses"], "spooled": spooled, "ledger": ledger_check(c, run)}


# -- Redis restarted empty mid-load -------------------------------------------------------------
def redis_restart(c: Cluster, rps: float, duration_s: float, restart_at_s: float, limit_usd: str,
                  down_s: float = 0.5) -> dict[str, Any]:
    """A team budget near half spent when Redis restarts empty; load continues past the limit.
    The ledger total must stay within the limit (the counters were rebuilt, not reset)."""
    assert c.redis is not None, "needs the cluster's private Redis"
    redis = c.redis
    team = _prefix("redis-team")
    bid = team
    c.put_budget({"id": bid, "scope": {"team": team}, "limit_usd": limit_usd, "period": "day"})
    key = c.create_key(team=team)["key"]
    fired = threading.Event()
    window: dict[str, float] = {}
    rebuilds_before = _rebuilds(c)

    def restart() -> None:
        window["down"] = time.monotonic()
        redis.restart(down_s)
        window["up"] = time.monotonic()

    def tick(elapsed: float) -> None:
        if elapsed >= restart_at_s and not fired.is_set():
            fired.set()
            window["at"] = elapsed
            threading.Thread(target=restart, daemon=True).start()

    run = asyncio.run(run_load(chat_request(c.url, key, model="premium"), rps, duration_s, _prefix("redis"),
                               on_tick=tick))
    ledger = ledger_check(c, run)
    spent = Decimal(c.ledger_cost(team))
    codes: dict[str, int] = {}
    for r in run.results:
        if r.status != 200:
            codes[f"{r.status} {r.error}"] = codes.get(f"{r.status} {r.error}", 0) + 1
    at = window.get("at", restart_at_s)
    late_503 = sum(1 for r in run.results if r.status == 503 and r.sched > at + down_s + 10)
    rebuilds = _rebuilds(c) - rebuilds_before
    last = run.results[-max(1, int(rps)):]  # the final second: the budget must be refusing
    return {
        "limit_usd": limit_usd, "ledger_spent_usd": str(spent), "overshoot_usd": str(max(Decimal(0),
                                                                                          spent - Decimal(limit_usd))),
        "sent": len(run.results), "ok": sum(1 for r in run.results if r.status == 200), "refusals": codes,
        "rebuilds": rebuilds, "late_503": late_503, "blocked_at_end": all(r.status == 429 for r in last),
        "unexpected": sum(n for k, n in codes.items()
                          if not k.startswith(("429 budget_exceeded", "503 budget_state_unavailable"))),
        "ledger": ledger,
    }


def _rebuilds(c: Cluster) -> int:
    """Counter rebuilds the replicas performed so far (the first happens at start, Redis being empty)."""
    return sum(int(r.health().get("budget_state", {}).get("rebuilds", 0)) for r in c.replicas)


# -- a replica SIGKILLed mid-stream -------------------------------------------------------------
def replica_kill(c: Cluster, victim: int, rps: float, duration_s: float, kill_at_s: float, limit_usd: str,
                 streams: int = 4, wait_release_s: float = 120.0) -> dict[str, Any]:
    """Slow streams on the victim hold reservations on a team budget; background load runs through
    nginx; the victim is SIGKILLed, then restarted. Checks: requests after the kill are served by
    the others; every answered request has its ledger event (the victim's journal is replayed);
    the dead replica's reservations lapse, leaving the budget with no leak."""
    r = c.replicas[victim]
    other = next(i for i in range(len(c.replicas)) if i != victim)
    team = _prefix("kill-team")
    c.put_budget({"id": team, "scope": {"team": team}, "limit_usd": limit_usd, "period": "day"})
    key = c.create_key(team=team)["key"]
    bg_key = c.create_key(team="kill-background")["key"]
    body = orjson.dumps({"model": "premium", "stream": True, "max_tokens": 200,
                         "messages": [{"role": "user", "content": "tell me a long story"}]})
    started = threading.Barrier(streams + 1, timeout=30)
    stream_outcome: list[str] = []
    cut = _prefix("kill-stream")

    def slow_stream(i: int) -> None:
        try:
            with httpx.stream("POST", r.url + "/v1/chat/completions", content=body, timeout=120,
                              headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json",
                                       "X-Request-Id": f"{cut}-{i}", "X-Mock-Tokens-Per-S": "5",
                                       "X-Mock-Output-Tokens": "200"}) as resp:
                it = resp.iter_lines()
                next(it)
                started.wait()
                done = any(line.startswith("data: [DONE]") for line in it)
                stream_outcome.append("complete" if done else "cut")
        except (httpx.HTTPError, threading.BrokenBarrierError) as e:
            stream_outcome.append(f"cut ({type(e).__name__})")

    threads = [threading.Thread(target=slow_stream, args=(i,), daemon=True) for i in range(streams)]
    for t in threads:
        t.start()
    started.wait()
    time.sleep(0.3)
    before = c.budget_status(team, other)["counters"][0]
    # Calls answered by the victim just before it dies: with the fault cluster's ledger flush interval
    # (10 s) their events are still in its writer's queue when the SIGKILL comes.
    direct = _prefix("kill-direct")
    quick = {"model": "gpt-4o-mini", "max_tokens": 4, "messages": [{"role": "user", "content": "x"}]}
    answered = [httpx.post(r.url + "/v1/chat/completions", json=quick, timeout=30, headers={
        "Authorization": f"Bearer {bg_key}", "X-Request-Id": f"{direct}-{i}"}).status_code for i in range(20)]
    killed: dict[str, float] = {}

    def tick(elapsed: float) -> None:
        if elapsed >= kill_at_s and "at" not in killed:
            killed["at"] = elapsed
            r.kill()

    run = asyncio.run(run_load(chat_request(c.url, bg_key), rps, duration_s, _prefix("kill"), on_tick=tick))
    for t in threads:
        t.join(30)
    in_ledger_before_restart = len(c.ledger_counts(run.prefix + "-"))
    r.start()  # same spool directory: the killed writer's journal is moved to the spool and replayed
    recovered = int(r.health()["ledger"].get("recovered", 0))
    at = killed.get("at", kill_at_s)
    after_kill = [x for x in run.results if x.sched > at + 0.5]
    ledger = ledger_check(c, run, answered_only=True)
    direct_found = sum(1 for n in c.ledger_counts(direct + "-").values() if n == 1)
    ledger["expected"] += answered.count(200)
    ledger["found"] += direct_found
    ledger["lost"] += answered.count(200) - direct_found
    # The streams the kill cut never ended in the process: their provisional rows came back from
    # its journal (status 500, replica_lost, the input cost estimated), one event each.
    cut_counts = c.ledger_counts(cut + "-")
    t0 = time.monotonic()
    released_after = None
    while time.monotonic() - t0 < wait_release_s:
        st = c.budget_status(team, other)["counters"][0]
        if Decimal(st["reserved"]) == 0:
            released_after = round(time.monotonic() - t0, 1)
            break
        time.sleep(1.0)
    final = c.budget_status(team, other)["counters"][0]
    return {
        "streams": stream_outcome, "reserved_before_kill": before["reserved"],
        "statuses": run.summary()["statuses"],
        "server_errors_after_kill": sum(1 for x in after_kill if x.status >= 500 or x.status == 0),
        "in_ledger_before_restart": in_ledger_before_restart, "journal_recovered": recovered,
        "cut_streams_in_ledger": sum(1 for n in cut_counts.values() if n == 1),
        "released_after_s": released_after, "reserved_final": final["reserved"], "spent_final": final["spent"],
        "ledger": ledger,
    }


# -- upstream faults ----------------------------------------------------------------------------
def upstream_faults(c: Cluster) -> dict[str, Any]:
    key = c.create_key(team="upstream-faults")
    h = {"Authorization": f"Bearer {key['key']}"}
    url = c.url + "/v1/chat/completions"
    prefix = _prefix("up")
    checks: dict[str, Any] = {}

    def chat(model: str, rid: str, stream: bool = False, **extra: str) -> httpx.Response:
        return httpx.post(url, json={"model": model, "max_tokens": 40, "stream": stream,
                                     "messages": [{"role": "user", "content": "hello there"}]},
                          headers={**h, "X-Request-Id": f"{prefix}-{rid}", **extra}, timeout=60)

    r = chat("slow-model", "slow")
    checks["slow_falls_back"] = r.status_code == 200 and "fallback from slow-model" in r.headers.get(
        "x-margin-route", "")
    burst = [chat("failing-model", f"burst-{i}") for i in range(12)]
    checks["5xx_burst_falls_back"] = all(x.status_code == 200 and "backup" in x.headers.get("x-margin-route", "")
                                         for x in burst)
    r = chat("failing-alone", "alone")
    err = r.json().get("error", {}) if r.headers.get("content-type", "").startswith("application/json") else {}
    checks["5xx_without_fallback_is_clear"] = r.status_code in (502, 503) and bool(err.get("message")) and \
        err.get("code") in ("upstream_error", "upstream_unavailable", "circuit_open")
    r = chat("garbage-model", "garbage", **{"X-Mock-Invalid-Json": "1"})
    err = r.json().get("error", {})
    checks["invalid_json_is_clear"] = r.status_code == 502 and err.get("code") == "invalid_upstream_response" and \
        "not JSON" in err.get("message", "")
    r = chat("garbage-fallback", "garbage-fb", **{"X-Mock-Invalid-Json": "1"})
    checks["invalid_json_falls_back"] = r.status_code == 200 and "backup" in r.headers.get("x-margin-route", "")
    r = chat("reset-model", "reset", stream=True)
    text = r.text
    checks["reset_mid_stream_ends_with_error_event"] = r.status_code == 200 and '"content"' in text and \
        'data: {"error"' in text and "[DONE]" not in text
    c.wait_ledger_idle(60)
    rows = asyncio.run(_events(c.ledger_url, prefix))
    by = {}
    for row in rows:
        by.setdefault(row["request_id"].removeprefix(prefix + "-"), []).append(row)
    reset_ev = by.get("reset", [{}])[0]
    checks["partial_stream_metered"] = reset_ev.get("status") == 502 and (reset_ev.get("output_tokens") or 0) > 0 \
        and Decimal(str(reset_ev.get("cost_usd") or 0)) > 0 and reset_ev.get("usage_source") == "estimated"
    slow = by.get("slow", [])
    checks["each_attempt_metered"] = len(slow) >= 2 and sum(1 for e in slow if e["status"] == 200) == 1 and \
        any(e.get("error_type") == "upstream_timeout" for e in slow)
    return {"checks": checks, "passed": all(checks.values()), "events": len(rows)}


async def _events(ledger_url: str, prefix: str) -> list[dict[str, Any]]:
    import asyncpg

    conn = await asyncpg.connect(ledger_url)
    try:
        rows = await conn.fetch("SELECT request_id, status, error_type, output_tokens, cost_usd, usage_source "
                                "FROM events WHERE request_id LIKE $1", prefix + "-%")
    finally:
        await conn.close()
    return [dict(r) for r in rows]
