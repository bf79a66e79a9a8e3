"""`make soak`: the full scale-out, reliability and security run of issue 10, on this machine.

    .venv/bin/python bench/soak.py --out BENCHMARKS.md            # full: ~20 minutes
    .venv/bin/python bench/soak.py --quick                        # the same steps, short (~4 minutes)

Steps, each on a real cluster (replicas behind a private nginx, private PostgreSQL and Redis, mock
upstreams; bench/cluster):
  1. steady: open-loop load at a fixed RPS across 3 replicas for --duration s after --warmup s, with
     budgets, metering and rate limits on: zero 5xx, throughput, p50/p99 (and added latency against
     the mock called directly in the same run), RSS growth per replica after warm-up (< 5%);
  2. PostgreSQL stopped (`pg_ctl -m immediate`) for --pg-down s mid-load, then started;
  3. Redis restarted empty mid-load with a team budget half spent;
  4. upstream faults: slow, 5xx bursts, resets mid-stream, invalid JSON;
  5. a replica SIGKILLed mid-stream, then restarted;
  6. schemathesis against /openapi.json (--fuzz-examples per operation).
Each step ends with a count. Prints a table, writes bench/results/soak.json and, with --out, the
section between <!-- soak:start --> and <!-- soak:end --> of that file. Exit code 1 if any
requirement fails (5xx in steady load, events lost or duplicated, budget overshoot, RSS growth
>= 5%, a failed fault check, a fuzzing failure)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "bench"))

from bench.cluster import Cluster, faults  # noqa: E402
from procs import machine_info  # noqa: E402
from render import update_markdown  # noqa: E402

MARK_START, MARK_END = "<!-- soak:start -->", "<!-- soak:end -->"


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rps", type=float, default=100.0, help="steady load, requests per second (default 100)")
    p.add_argument("--duration", type=float, default=600.0, help="steady load, measured seconds (default 600)")
    p.add_argument("--warmup", type=float, default=60.0, help="seconds of load before RSS and latency count")
    p.add_argument("--replicas", type=int, default=3)
    p.add_argument("--pg-down", type=float, default=60.0, help="seconds PostgreSQL stays down (default 60)")
    p.add_argument("--fuzz-examples", type=int, default=200, help="schemathesis examples per operation")
    p.add_argument("--quick", action="store_true", help="every step, short: 40 RPS, 20 s, PostgreSQL down 5 s")
    p.add_argument("--out", type=Path, help="markdown file whose soak section is rewritten (BENCHMARKS.md)")
    p.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "soak.json")
    a = p.parse_args(argv)
    if a.quick:
        a.rps, a.duration, a.warmup, a.pg_down, a.fuzz_examples = 40.0, 20.0, 5.0, 5.0, 15
    if a.rps <= 0 or a.duration <= 0 or a.replicas < 2:
        p.error("--rps and --duration must be > 0 and --replicas >= 2")
    return a


def _step(name: str, doc: dict[str, Any], fn: Any) -> None:
    t0 = time.monotonic()
    print(f"--- {name} ...", flush=True)
    try:
        doc["steps"][name] = fn()
    except Exception as e:  # one broken step must not hide the others' figures
        doc["steps"][name] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-3000:]}
    doc["steps"][name]["wall_s"] = round(time.monotonic() - t0, 1)
    print(json.dumps({k: v for k, v in doc["steps"][name].items() if k != "trace"}, default=str)[:1500], flush=True)


def _fuzz(examples: int) -> dict[str, Any]:
    env = {**os.environ, "MARGIN_FUZZ_EXAMPLES": str(examples)}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_fuzz.py"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    last = (r.stdout.strip().splitlines() or [""])[-1]
    return {"examples_per_operation": examples, "passed": r.returncode == 0, "summary": last,
            **({"output": r.stdout[-3000:]} if r.returncode else {})}


def verdicts(doc: dict[str, Any]) -> dict[str, bool]:
    s = doc["steps"]
    st, pg, rd = s.get("steady", {}), s.get("postgres_down", {}), s.get("redis_restart", {})
    up, kill, fz = s.get("upstream_faults", {}), s.get("replica_kill", {}), s.get("fuzzing", {})
    rss = st.get("rss_growth_pct") or [100.0]
    return {
        "steady: zero 5xx": st.get("server_errors") == 0 and st.get("incomplete_streams") == 0,
        "steady: RPS held (>= 95% of target)": (st.get("achieved_rps") or 0) >= 0.95 * (st.get("scheduled_rps") or 1e9),
        "steady: RSS growth < 5% per replica": max(rss) < 5.0,
        "postgres down: all served, nothing lost": pg.get("statuses") == {"200": pg.get("sent")}
        and _clean(pg.get("ledger")),
        "redis restart: no overshoot": rd.get("overshoot_usd") is not None and Decimal(rd["overshoot_usd"]) == 0
        and rd.get("rebuilds", 0) >= 1
        and rd.get("unexpected") == 0 and _clean(rd.get("ledger")),
        "upstream faults: all checks": bool(up.get("passed")),
        "replica killed: no loss, no leak": kill.get("server_errors_after_kill") == 0 and _clean(kill.get("ledger"))
        and kill.get("released_after_s") is not None and Decimal(str(kill.get("reserved_final", "1"))) == 0,
        "fuzzing: zero 5xx": bool(fz.get("passed")),
    }


def _clean(ledger: dict[str, int] | None) -> bool:
    return bool(ledger) and ledger["lost"] == 0 and ledger["duplicated"] == 0  # type: ignore[index]


def totals(doc: dict[str, Any]) -> dict[str, Any]:
    s = doc["steps"]
    lost = sum(int((s.get(k) or {}).get("ledger", {}).get("lost", 0)) for k in s)
    dup = sum(int((s.get(k) or {}).get("ledger", {}).get("duplicated", 0)) for k in s)
    v = doc["verdicts"]
    faults_ = [k for k in v if not k.startswith(("steady", "fuzzing"))]
    over = s.get("redis_restart", {}).get("overshoot_usd")
    return {"faults_survived": sum(v[k] for k in faults_), "faults_total": len(faults_), "events_lost": lost,
            "events_duplicated": dup,
            "budget_overshoot_usd": f"{Decimal(over):.2f}" if over is not None else "n/a"}


def markdown(doc: dict[str, Any]) -> str:
    m, st, t = doc["machine"], doc["steps"].get("steady", {}), doc["totals"]
    pg, rd, kill = (doc["steps"].get(k, {}) for k in ("postgres_down", "redis_restart", "replica_kill"))
    rows = "\n".join(f"| {k} | {'pass' if ok else '**FAIL**'} |" for k, ok in doc["verdicts"].items())
    rss = ", ".join(f"{g:+.1f}%" for g in st.get("rss_growth_pct", []))
    return f"""## Scale-out soak and faults

{doc['settings']['replicas']} `margin serve` replicas behind nginx, PostgreSQL ledger and Redis state (private
instances), mock upstreams, all on this machine; budgets, metering and per-key rate limits on for every
call. Open-loop load (bench/cluster/load.py). Method and steps: `bench/soak.py --help`.

- Command: `{doc['command']}`
- Date: {doc['date_utc']} (whole run {doc['wall_s']:.0f} s)
- Machine: {m['nproc']} CPUs, {m['cpu']}, Python {m['python']}, margin commit {m['margin_commit']}

| figure | value |
|---|---|
| steady load | {st.get('rps')} RPS for {st.get('duration_s')} s after {st.get('warmup_s')} s warm-up |
| RPS held (through margin) | {st.get('achieved_rps')} of {st.get('scheduled_rps')} scheduled (the rest went \
to the mock directly, as the baseline) |
| p50 / p99 through nginx + margin | {st.get('p50_ms')} / {st.get('p99_ms')} ms |
| added p50 / p99 (vs the mock direct) | {st.get('added_p50_ms')} / {st.get('added_p99_ms')} ms |
| 5xx in steady load | {st.get('server_errors')} of {st.get('sent')} |
| RSS growth per replica after warm-up | {rss} |
| PostgreSQL down | {pg.get('down_s')} s: {pg.get('statuses')}, {pg.get('spooled')} events spooled |
| Redis restarted | spent {rd.get('ledger_spent_usd')} of {rd.get('limit_usd')} USD; refusals {rd.get('refusals')} |
| replica SIGKILLed | reservations released after {kill.get('released_after_s')} s; \
{kill.get('journal_recovered')} events recovered from its journal |
| **faults survived** | **{t['faults_survived']} / {t['faults_total']}** |
| **events lost** (must be 0) | **{t['events_lost']}** (duplicated: {t['events_duplicated']}) |
| **budget overshoot** (must be $0.00) | **${t['budget_overshoot_usd']}** |

| requirement | result |
|---|---|
{rows}
"""


def main(argv: list[str] | None = None) -> int:
    a = _args(argv)
    t0 = time.monotonic()
    doc: dict[str, Any] = {
        "command": "bench/soak.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date_utc": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine_info(),
        "settings": {"rps": a.rps, "duration_s": a.duration, "warmup_s": a.warmup, "replicas": a.replicas,
                     "pg_down_s": a.pg_down, "fuzz_examples": a.fuzz_examples, "quick": a.quick},
        "steps": {},
    }
    c = Cluster(faults.fault_spec(replicas=a.replicas))
    try:
        c.start()
        _step("steady", doc, lambda: faults.steady(c, a.rps, a.duration, a.warmup))
        _step("postgres_down", doc, lambda: faults.postgres_outage(
            c, min(a.rps, 50.0), a.pg_down + 30, 10, a.pg_down))
        _step("redis_restart", doc, lambda: faults.redis_restart(c, 20, 12, 2.5, "0.07"))
        _step("upstream_faults", doc, lambda: faults.upstream_faults(c))
    finally:
        c.stop()
    spec = faults.fault_spec(replicas=2)
    spec.ledger_options = {"flush_interval_ms": 10000}
    spec.providers = [dict(p, timeout_s=2) if p["name"] == "steady" else p for p in spec.providers]
    k = Cluster(spec)
    try:
        k.start()
        _step("replica_kill", doc, lambda: faults.replica_kill(k, 1, 20, 10, 0.5, "1.00", wait_release_s=120))
    finally:
        k.stop()
    _step("fuzzing", doc, lambda: _fuzz(a.fuzz_examples))
    doc["wall_s"] = time.monotonic() - t0
    doc["verdicts"] = verdicts(doc)
    doc["totals"] = totals(doc)
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print(markdown(doc))
    print(f"wrote {a.json}")
    if a.out:
        update_markdown(a.out, markdown(doc), MARK_START, MARK_END)
        print(f"updated {a.out}")
    return 0 if all(doc["verdicts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
