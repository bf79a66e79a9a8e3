"""What a budget check costs per request, side by side in one run.

    .venv/bin/python bench/budget_overhead.py [--rps 200,500] [--duration 20] [--out BENCHMARKS.md]

Three gateways in front of one mock upstream, all metering into SQLite: no budgets; three budgets
(org, team, per-user "*") plus a per-key rate limit on the in-process state; the same on Redis
(127.0.0.1:6379, db 15, flushed first). Every request then reserves and settles four counters.
Open-loop load (bench/loadgen.py), rounds interleaved none -> memory -> redis; the added latency
is each configuration's percentile minus the no-budget gateway's at the same rate."""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common import console
from procs import machine_info, settle
from render import update_markdown
from rich.table import Table
from stack import Stack, run_load, start_margin, start_mock

REDIS_URL = "redis://127.0.0.1:6379/15"
BUDGETS: dict[str, Any] = {
    "budgets": [
        {"id": "org", "scope": {"org": "bench"}, "limit_usd": "1000000", "period": "month",
         "thresholds": [{"at": 80, "action": "notify"}, {"at": 100, "action": "block"}]},
        {"id": "team", "scope": {"team": "perf"}, "limit_usd": "1000000", "period": "day"},
        {"id": "per-user", "scope": {"user": "*"}, "limit_usd": "1000000", "period": "day"},
    ],
    "rate_limits": [{"id": "per-key", "scope": {"key": "*"}, "rpm": 10_000_000}],
}
CONFIGS: dict[str, dict[str, Any]] = {
    "none": {},
    "memory": {**BUDGETS, "state": "memory"},
    "redis": {**BUDGETS, "state": REDIS_URL},
}


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rps", default="200,500")
    ap.add_argument("--duration", type=float, default=20.0, help="measured s per config and level (all rounds)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    import redis

    redis.Redis.from_url(REDIS_URL).flushdb()
    levels = [float(x) for x in args.rps.split(",")]
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="margin-bench-budgets-") as tmp:
        stack = Stack(Path(tmp))
        (stack.tmp / "logs").mkdir()
        lat: dict[tuple[float, str], list[float]] = {}
        cpu: dict[tuple[float, str], list[float]] = {}
        try:
            start_mock(stack, [], None)
            for name, extra in CONFIGS.items():
                start_margin(stack, name, extra)
            for rps in levels:
                for rnd in range(args.rounds):
                    for name in CONFIGS:
                        settle(stack.services)
                        res = run_load(stack, stack.targets[name], rps, args.duration / args.rounds, 2.0, 10.0)
                        lat.setdefault((rps, name), []).extend(res["latencies_ms"])
                        cpu.setdefault((rps, name), []).append(res["cpu_ms_per_req"])
                        console.print(f"{rps:>6.0f} RPS r{rnd + 1} {name:7} p50 {pct(res['latencies_ms'], .5):6.2f}"
                                      f" p99 {pct(res['latencies_ms'], .99):6.2f} ms  errors {res['errors']}")
        finally:
            for svc in stack.services:
                svc.stop()
    rows = []
    for rps in levels:
        base50, base99 = pct(lat[(rps, "none")], 0.5), pct(lat[(rps, "none")], 0.99)
        for name in CONFIGS:
            xs = lat[(rps, name)]
            rows.append({"rps": rps, "config": name, "n": len(xs), "p50": pct(xs, .5), "p99": pct(xs, .99),
                         "added_p50": None if name == "none" else pct(xs, .5) - base50,
                         "added_p99": None if name == "none" else pct(xs, .99) - base99,
                         "cpu_ms": statistics.mean(cpu[(rps, name)])})
    show(rows)
    if args.out:
        update_markdown(args.out, section(rows, args, time.monotonic() - started),
                        "<!-- budgets:start -->", "<!-- budgets:end -->")
        console.print(f"wrote {args.out}")


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:+.2f}"


def show(rows: list[dict[str, Any]]) -> None:
    t = Table(title="budget check overhead (added = config minus no-budget gateway, same RPS)")
    for c in ("RPS", "config", "requests", "p50 ms", "p99 ms", "added p50", "added p99", "CPU ms/req"):
        t.add_column(c, justify="left" if c == "config" else "right")
    for r in rows:
        t.add_row(f"{r['rps']:.0f}", r["config"], str(r["n"]), f"{r['p50']:.2f}", f"{r['p99']:.2f}",
                  _f(r["added_p50"]), _f(r["added_p99"]), f"{r['cpu_ms']:.2f}")
    console.print(t)


def section(rows: list[dict[str, Any]], args: argparse.Namespace, took: float) -> str:
    m = machine_info()
    lines = [
        "## Budget check overhead", "",
        "Added latency of budgets on a non-streaming chat call: three budgets (org, team, per-user) and a",
        "per-key rate limit, so each request reserves and settles four counters atomically, on the",
        "in-process state and on Redis, beside the same gateway with no budgets, in one run.", "",
        f"- Command: `.venv/bin/python bench/budget_overhead.py --rps {args.rps} --duration {args.duration:g}"
        f" --out BENCHMARKS.md`",
        f"- Date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC (run {took:.0f} s); machine: {m['nproc']} CPUs,"
        f" {m['cpu']}, Python {m['python']}, margin commit {m['margin_commit']}; Redis 7 on 127.0.0.1:6379",
        f"- {args.rounds} interleaved rounds x {args.duration / args.rounds:g} s per config and level, open loop", "",
        "| RPS | config | requests | p50 ms | p99 ms | added p50 | added p99 | server CPU ms/req |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['rps']:.0f} | {r['config']} | {r['n']} | {r['p50']:.2f} | {r['p99']:.2f} |"
                     f" {_f(r['added_p50'])} | {_f(r['added_p99'])} | {r['cpu_ms']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
