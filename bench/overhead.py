"""The latency margin adds to a chat call, beside a direct call and beside LiteLLM, in one run.

    .venv/bin/python bench/overhead.py [--rps 25,200,500,1000] [--duration 20] [--out BENCHMARKS.md]
    .venv/bin/python bench/overhead.py --quick          # smoke: 200 RPS, 5 s, no LiteLLM

Starts on free 127.0.0.1 ports: the mock upstream, the margin gateway (metering ON: SQLite
ledger) with a fresh virtual key, and - if `.venv-litellm` exists (bench/setup_litellm.sh) - a
LiteLLM proxy routed to the same mock. Then, for every RPS level, drives each target with the
open-loop generator in bench/loadgen.py (own process; latency from the *scheduled* send time),
in interleaved rounds (direct, margin, litellm, direct, margin, litellm, ...) to cancel drift.
`--duration` is the measured time per target and RPS level, split evenly across the rounds.

Reports achieved RPS, p50/p90/p99/max, errors, latency added over the direct call at the same
RPS, LiteLLM's added latency relative to margin's, server CPU per request, and the max sustained
RPS (achieved >= 95% of target, errors < 0.1%, p99 < 100 ms), stepping up past the highest level
while the time budget allows. Writes bench/results/overhead.json and, with --out, the section
between <!-- overhead:start --> and <!-- overhead:end --> of that Markdown file.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Run as a script, so Python puts bench/ (this file's directory) first on sys.path: the sibling
# modules below are imported as plain top-level modules, not as a `bench` package.
from common import BODY, LITELLM, LITELLM_VERSION, RESULTS_JSON, ROOT, TARGET_ORDER, by_level, console, level_key
from procs import StartupError, machine_info, settle
from render import fmt_ms, reading, report
from stack import Stack, run_load, start_litellm, start_margin, start_mock

# "Sustained" criteria.
MIN_ACHIEVED_FRACTION = 0.95
MAX_ERROR_RATE = 0.001
MAX_P99_MS = 100.0

FOREIGN_CPU_WARN_PCT = 10.0
LOADGEN_CPU_WARN_PCT = 80.0

# Past this a target is dropped from higher levels.
OVERLOAD_ACHIEVED_FRACTION = 0.5
OVERLOAD_ERROR_RATE = 0.2


# --------------------------------------------------------------------------- summaries


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an ascending sequence (q in [0, 100])."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return float(sorted_values[min(rank, len(sorted_values)) - 1])


def summarise(rps: float, runs: list[dict[str, Any]]) -> dict[str, Any]:
    lats = sorted(x for r in runs for x in r["latencies_ms"])
    sent = sum(r["sent"] for r in runs)
    ok = sum(r["ok"] for r in runs)
    span = sum(r["span_s"] for r in runs)
    non200: dict[str, int] = {}
    kinds: dict[str, int] = {}
    for r in runs:
        for k, v in r["non_200"].items():
            non200[k] = non200.get(k, 0) + v
        for k, v in r["error_kinds"].items():
            kinds[k] = kinds.get(k, 0) + v
    errors = sent - ok
    s: dict[str, Any] = {
        "target_rps": rps,
        "sent": sent,
        "ok": ok,
        "errors": errors,
        "error_rate": errors / sent if sent else 1.0,
        "non_200": non200,
        "error_kinds": kinds,
        "achieved_rps": ok / span if span else 0.0,
        "p50_ms": percentile(lats, 50),
        "p90_ms": percentile(lats, 90),
        "p99_ms": percentile(lats, 99),
        "max_ms": lats[-1] if lats else math.nan,
        "cpu_ms_per_req": sum(r["cpu_ms_per_req"] for r in runs) / len(runs),
        "loadgen_cpu_pct": 100.0 * sum(r["loadgen_cpu_s"] for r in runs) / sum(r["loadgen_wall_s"] for r in runs),
        "foreign_cpu_pct": sum(r["foreign_cpu_pct"] for r in runs) / len(runs),
        "send_lag_p99_ms": max((r["send_lag_p99_ms"] or 0.0) for r in runs),
        "rounds_p50_ms": [percentile(sorted(r["latencies_ms"]), 50) for r in runs],
        "rounds_p99_ms": [percentile(sorted(r["latencies_ms"]), 99) for r in runs],
    }
    s["sustained"] = bool(
        s["achieved_rps"] >= MIN_ACHIEVED_FRACTION * rps
        and s["error_rate"] < MAX_ERROR_RATE
        and s["p99_ms"] < MAX_P99_MS
    )
    return s


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or math.isnan(a) or math.isnan(b) or b <= 0.05:
        return None  # margin's added latency within noise of zero: a ratio means nothing
    return a / b


def compute_added(results: dict[str, dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    rows = []
    for rps_key, by_target in by_level(results):
        d = by_target.get("direct")
        if d is None:
            continue
        row: dict[str, Any] = {"rps": float(rps_key)}
        for name in ("margin", "litellm"):
            t = by_target.get(name)
            row[f"{name}_added_p50_ms"] = t["p50_ms"] - d["p50_ms"] if t else None
            row[f"{name}_added_p99_ms"] = t["p99_ms"] - d["p99_ms"] if t else None
            if t:
                t["added_p50_ms"] = row[f"{name}_added_p50_ms"]
                t["added_p99_ms"] = row[f"{name}_added_p99_ms"]
        # A ratio only means something where neither proxy is queueing.
        both = all(by_target.get(n, {}).get("sustained") for n in ("margin", "litellm"))
        row["litellm_over_margin_p50"] = (
            ratio(row["litellm_added_p50_ms"], row["margin_added_p50_ms"]) if both else None
        )
        row["litellm_over_margin_p99"] = (
            ratio(row["litellm_added_p99_ms"], row["margin_added_p99_ms"]) if both else None
        )
        rows.append(row)
    return rows


def max_sustained(results: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name in TARGET_ORDER:
        tested = sorted(float(r) for r, bt in results.items() if name in bt)
        if not tested:
            continue
        passing = [r for r in tested if results[level_key(r)][name]["sustained"]]
        best = max(passing) if passing else None
        out[name] = {
            "max_sustained_rps": best,
            "highest_tested_rps": tested[-1],
            "lowest_tested_rps": tested[0],
            "next_failed_rps": next((r for r in tested if best is not None and r > best), None),
            "lower_bound_only": best is not None and best == tested[-1],  # never failed: ceiling unknown
        }
    return out


def derived_notes(doc: dict[str, Any]) -> list[str]:
    notes = []
    results = doc["results"]
    foreign = [s["foreign_cpu_pct"] for bt in results.values() for s in bt.values()]
    if foreign and max(foreign) > FOREIGN_CPU_WARN_PCT:
        notes.append(
            f"other processes used up to {max(foreign):.0f}% of the machine's CPU during some runs "
            f"(mean {sum(foreign) / len(foreign):.0f}%; load average {doc['loadavg_start'][0]:.1f} at start): "
            "expect noisy tails"
        )
    busy_gen = sorted(
        {float(k) for k, bt in results.items() for s in bt.values() if s["loadgen_cpu_pct"] > LOADGEN_CPU_WARN_PCT}
    )
    if busy_gen:
        notes.append(
            "the load generator itself needed > "
            f"{LOADGEN_CPU_WARN_PCT:.0f}% of a core at {', '.join(f'{x:g}' for x in busy_gen)} RPS: "
            "there the box, not only the target, is the limit"
        )
    return notes


def finish(doc: dict[str, Any], args: argparse.Namespace) -> int:
    """Derive added latency, max sustained RPS and the reading; print; write JSON and Markdown."""
    doc["derived_notes"] = derived_notes(doc)
    doc["added"] = compute_added(doc["results"])
    doc["max_sustained"] = max_sustained(doc["results"])
    doc["reading"] = reading(doc)
    report(doc, args.json, args.out)
    return 0


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--rps",
        default="25,200,500,1000",
        help="comma-separated RPS levels (25: light load, where a slow proxy is not yet queueing)",
    )
    p.add_argument("--duration", type=float, default=20.0, help="measured s per target and level (all rounds)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds per level")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured s before each measurement")
    p.add_argument("--step-up", default="1500,2000", help="levels tried past the highest --rps while sustained")
    p.add_argument("--budget", type=float, default=360.0, help="s; step-ups that would exceed it are skipped")
    p.add_argument("--targets", default="direct,margin,litellm", help="subset of direct,margin,litellm")
    p.add_argument("--timeout", type=float, default=10.0, help="per-request timeout, s")
    p.add_argument("--mock-arg", action="append", default=[], help="extra argument for margin mock-upstream")
    p.add_argument("--mock-cmd", help="run this upstream instead of the mock ('{port}' is substituted)")
    p.add_argument("--out", type=Path, help="Markdown file whose overhead section is replaced")
    p.add_argument("--json", type=Path, help=f"results JSON path (default {RESULTS_JSON.relative_to(ROOT)})")
    p.add_argument("--quick", action="store_true", help="smoke run: 200 RPS, 5 s, 1 round, no LiteLLM")
    p.add_argument("--from-json", type=Path, help="do not measure: re-render a results JSON from an earlier run")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs, ledger)")
    a = p.parse_args(argv)
    if a.quick:
        a.rps, a.duration, a.rounds, a.step_up = "200", 5.0, 1, ""
        a.targets = ",".join(t for t in a.targets.split(",") if t != "litellm")
    if a.json is None:  # a smoke run must not overwrite the real results
        a.json = RESULTS_JSON.with_name("overhead-quick.json") if a.quick else RESULTS_JSON
    return a


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    levels = sorted({float(x) for x in args.rps.split(",") if x.strip()})
    steps = [float(x) for x in args.step_up.split(",") if x.strip()]
    wanted = [t.strip() for t in args.targets.split(",") if t.strip()]
    bad = [t for t in wanted if t not in TARGET_ORDER]
    if bad or "direct" not in wanted or not levels or args.rounds < 1 or args.duration <= 0:
        console.print(f"[red]bad arguments (targets must include direct; unknown: {bad})[/red]")
        return 2
    per_round = args.duration / args.rounds
    if args.from_json:
        old: dict[str, Any] = json.loads(args.from_json.read_text())
        old["notes"] = [n for n in old["notes"] if not n.startswith("other processes used")]  # now derived
        return finish(old, args)
    signal.signal(signal.SIGTERM, _terminate)
    command = shlex.join([".venv/bin/python", "bench/overhead.py", *(argv if argv is not None else sys.argv[1:])])
    started = time.monotonic()
    loadavg_start = os.getloadavg()
    tmpdir = tempfile.mkdtemp(prefix="margin-bench-")
    stack = Stack(Path(tmpdir))
    results: dict[str, dict[str, dict[str, Any]]] = {}
    raw_rounds: dict[str, dict[str, list[dict[str, Any]]]] = {}
    ok = interrupted = False
    try:
        with console.status("starting mock upstream"):
            start_mock(stack, args.mock_arg, args.mock_cmd)
        if "margin" in wanted:
            with console.status("starting margin gateway"):
                start_margin(stack)
        if "litellm" in wanted:
            if LITELLM.exists():
                with console.status("starting LiteLLM proxy"):
                    start_litellm(stack)
            else:
                stack.notes.append(f"LiteLLM skipped: {LITELLM.relative_to(ROOT)} missing (run bench/setup_litellm.sh)")
        names = [n for n in TARGET_ORDER if n in stack.targets]
        console.print(
            f"targets: {', '.join(names)} | levels {', '.join(f'{x:g}' for x in levels)} RPS | "
            f"{args.rounds} x {per_round:g} s (+{args.warmup:g} s warm-up) each"
        )

        active = list(names)

        def measure(rps: float, targets: list[str], rounds: int) -> None:
            key = level_key(rps)
            todo = list(targets)
            for rnd in range(rounds):
                for name in list(todo):
                    waited = settle(stack.services)
                    if waited is None:
                        stack.notes.append(f"servers still busy before {name} at {rps:g} RPS (settle timed out)")
                    t = stack.targets[name]
                    with console.status(f"{rps:g} RPS round {rnd + 1}/{rounds}: {name}"):
                        r = run_load(stack, t, rps, per_round, args.warmup, args.timeout)
                    lat = sorted(r["latencies_ms"])
                    console.print(
                        f"  {rps:>6g} RPS r{rnd + 1} {name:<8} achieved {r['achieved_rps']:7.1f}  "
                        f"p50 {fmt_ms(percentile(lat, 50)):>6}  p99 {fmt_ms(percentile(lat, 99)):>6} ms  "
                        f"errors {r['errors']:<5} "
                        f"loadgen CPU {100 * r['loadgen_cpu_s'] / r['loadgen_wall_s']:3.0f}%  "
                        f"other processes {r['foreign_cpu_pct']:3.0f}%"
                    )
                    raw_rounds.setdefault(key, {}).setdefault(name, []).append(r)
                    for svc in stack.services:
                        if not svc.alive():
                            raise RuntimeError(f"{svc.name} died during the run:\n{svc.tail()}")
                    err_rate = r["errors"] / max(1, r["sent"])
                    if name != "direct" and (
                        r["achieved_rps"] < OVERLOAD_ACHIEVED_FRACTION * rps or err_rate > OVERLOAD_ERROR_RATE
                    ):
                        # Hopelessly overloaded (most requests time out). Its backlog would keep
                        # burning the shared CPUs during the next measurements, so stop it now
                        # and do not run it again at this or any higher level.
                        todo.remove(name)
                        if name in active:
                            active.remove(name)
                        stack.retire(name)
                        stack.notes.append(
                            f"{name} overloaded at {rps:g} RPS (achieved {r['achieved_rps']:.0f}, "
                            f"errors {100 * err_rate:.0f}%): stopped, not run at higher levels"
                        )
            for name, runs in raw_rounds[key].items():  # includes targets retired mid-level
                results.setdefault(key, {})[name] = summarise(rps, runs)

        for rps in levels:
            if len(active) > 1 or len(names) == 1:  # stop once every proxy has been dropped
                measure(rps, active, args.rounds)

        # Step-up search past the highest level, for targets still sustaining it (direct always
        # comes along as the baseline). One round each; skipped if it would blow the budget.
        top = max(levels)
        stepping = [n for n in active if n != "direct" and results[level_key(top)][n]["sustained"]]
        for rps in (s for s in steps if s > top):
            if not stepping:
                break
            cost = (len(stepping) + 1) * (per_round + args.warmup + 3.0)
            if time.monotonic() - started + cost > args.budget:
                stack.notes.append(f"step-up to {rps:g} RPS skipped (time budget {args.budget:g} s)")
                break
            measure(rps, ["direct", *stepping], 1)
            stepping = [n for n in stepping if results[level_key(rps)][n]["sustained"]]
        ok = True
    except KeyboardInterrupt:
        interrupted = True
        console.print("[yellow]interrupted; stopping everything[/yellow]")
    except StartupError as e:
        console.print(f"[red]start-up failed:[/red] {e}")
    finally:
        with console.status("stopping services"):
            stack.stop()
        if args.keep_tmp or not (ok or interrupted):
            console.print(f"temp dir kept: {tmpdir}")
        else:
            subprocess.run(["rm", "-rf", tmpdir], check=False)
    if not ok:
        return 1

    doc: dict[str, Any] = {
        "command": command,
        "date_utc": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_info(),
        "settings": {
            "levels_rps": levels,
            "step_up_rps": steps,
            "rounds": args.rounds,
            "measured_s_per_round": per_round,
            "warmup_s": args.warmup,
            "request": BODY.decode(),
            "mock": stack.mock_cmd,
            "litellm": LITELLM_VERSION if "litellm" in stack.targets else None,
        },
        "results": results,
        "notes": stack.notes,
        "loadavg_start": loadavg_start,
        "loadavg_end": os.getloadavg(),
        "wall_s": round(time.monotonic() - started, 1),
    }
    doc["rounds"] = {
        k: {n: [{kk: vv for kk, vv in r.items() if kk != "latencies_ms"} for r in rs] for n, rs in v.items()}
        for k, v in raw_rounds.items()
    }
    return finish(doc, args)


if __name__ == "__main__":
    sys.exit(main())
