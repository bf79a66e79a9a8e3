"""Analytics warehouse benchmark: fill a SQLite ledger with N synthetic events (default 1,000,000)
through margin's store, then time the warehouse refresh (first copy, an increment, nothing new)
and every dashboard page's queries, plain and restricted to one team.

    .venv/bin/python bench/analytics_warehouse.py --events 1000000 --out BENCHMARKS.md
    # optional: the same ledger read by DuckDB's sqlite scanner (duckdb 1.5.5 + its PyPI extension
    # in another venv), to compare scanning the ledger with copying it
    .venv/bin/python bench/analytics_warehouse.py --scanner-python /tmp/scanvenv/bin/python
    # side by side with an earlier margin (its own warehouse file, the same ledger, the same run):
    git archive <commit> src | tar -x -C /tmp/before
    .venv/bin/python bench/analytics_warehouse.py --before-src /tmp/before/src --out BENCHMARKS.md

A page's time is the sum of its queries, run one after another (the median of --repeat runs after
one warm-up). The ledger and the warehouse file are kept in --dir for re-runs."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.render import update_markdown

from margin.analytics import queries as q
from margin.analytics import runs as R
from margin.analytics.filters import Filter
from margin.analytics.outcomes import parse_outcome
from margin.analytics.synthetic import event_row, events
from margin.analytics.warehouse import Warehouse
from margin.ledger import open_store

START = datetime(2026, 9, 1, tzinfo=UTC)
DAYS = 90
NOW = START + timedelta(days=DAYS)


async def fill(url: str, n: int) -> tuple[float, int]:
    st = open_store(url)
    await st.open()
    t0 = time.perf_counter()
    if await st.count_events() >= n:
        await st.close()
        return 0.0, 0
    batch: list[dict[str, Any]] = []
    runs: dict[str, datetime] = {}
    for r in events(n, START, DAYS, seed=7):
        batch.append(r)
        if r["run_id"]:
            runs.setdefault(r["run_id"], datetime.fromisoformat(r["ts_start"]))
        if len(batch) == 10_000:
            await st.write_events(batch)
            batch = []
    if batch:
        await st.write_events(batch)
    for i, (run, t) in enumerate(runs.items()):
        if i % 10:
            await st.insert_outcome(parse_outcome({"run_id": run, "status": "success" if i % 4 else "failure",
                                                   "value_usd": "5"}, now=t + timedelta(minutes=3)))
    await st.close()
    return time.perf_counter() - t0, len(runs)


def timed(fn: Callable[[], Any], repeat: int) -> tuple[float, float]:
    """Median wall ms and median CPU ms (all of this process's threads: DuckDB uses both cores)."""
    fn()  # warm-up
    xs, cs = [], []
    for _ in range(repeat):
        t, c = time.perf_counter(), time.process_time()
        fn()
        xs.append((time.perf_counter() - t) * 1000)
        cs.append((time.process_time() - c) * 1000)
    return statistics.median(xs), statistics.median(cs)


def pages(wh: Warehouse, f: Filter, run_id: str) -> dict[str, Callable[[], Any]]:
    month = datetime(2026, 11, 1, tzinfo=UTC)
    return {
        "overview": lambda: (q.overview(wh, f, NOW), q.spend_series(wh, f, None, "day"),
                             q.top_spenders(wh, f, "user", 10)),
        "spend": lambda: (q.spend_series(wh, f, "team", "day"), q.spend_by(wh, f, ["team", "model"]),
                          q.top_spenders(wh, f, "model", 10), q.model_mix(wh, f)),
        "spend by tag, hourly": lambda: (q.spend_series(wh, f, "tag:feature", "hour"),),
        "outcomes": lambda: (R.cost_per_outcome(wh, f), R.outcome_trend(wh, f, "day")),
        "runs": lambda: (R.runs(wh, f, limit=50), R.run_steps(wh, run_id, f)),
        "budgets": lambda: (q.burn_down(wh, f, {"team": "search"}, month, NOW, Decimal(5000), NOW),
                            q.reroutes(wh, f)),
    }


def scanner(python: str, db: str) -> dict[str, float]:
    """The same ledger read through DuckDB's sqlite scanner (another venv: duckdb 1.5.5)."""
    code = f"""
import time, json, duckdb, duckdb_extension_sqlite_scanner as ext, glob, os
c = duckdb.connect()
path = glob.glob(os.path.join(os.path.dirname(ext.__file__), '**', '*.duckdb_extension'), recursive=True)[0]
c.execute(f"LOAD '{{path}}'")
c.execute("ATTACH '{db}' AS l (TYPE sqlite, READ_ONLY)")
out = {{}}
t = time.perf_counter()
c.execute("SELECT team, model, count(*), sum(CAST(cost_usd AS DECIMAL(38, 24))) FROM l.events "
          "WHERE ts_start >= '2026-11-01' GROUP BY ALL").fetchall()
out["spend by team, model, scanning SQLite (ms)"] = (time.perf_counter() - t) * 1000
t = time.perf_counter()
c.execute("CREATE TABLE e AS SELECT * FROM l.events")
out["full copy into DuckDB (s)"] = time.perf_counter() - t
print(json.dumps(out))
"""
    import orjson

    r = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=3600,
                       env={**os.environ, "HOME": os.environ.get("HOME", "/root")})
    if r.returncode != 0:
        return {"error": 1.0} if not r.stderr else {"error (see stderr)": 1.0}
    return dict(orjson.loads(r.stdout.strip().splitlines()[-1]))


def measure(a: Any, url: str, whpath: Path) -> dict[str, Any]:
    """Refresh timings and page timings of the margin on sys.path (this tree, or --before-src's)."""
    whpath.unlink(missing_ok=True)
    wh = Warehouse(url, whpath)
    t = time.perf_counter()
    first = wh.refresh_blocking()
    first_s = time.perf_counter() - t
    print(f"first refresh: {first.events} events, {first.outcomes} outcomes in {first_s:.1f} s", flush=True)
    salt = time.time_ns()  # new event ids on every run of the benchmark

    def add(rows: list[dict[str, Any]]) -> None:
        async def go() -> None:
            st = open_store(url)
            await st.open()
            await st.write_events(rows)
            await st.close()
        asyncio.run(go())

    one: list[float] = []  # live traffic: one new call, refreshed (what a strict dashboard view waits for)
    for i in range(a.repeat):
        add([event_row(random.Random(salt - i - 1), NOW + timedelta(seconds=i), "legal")])
        t = time.perf_counter()
        wh.refresh_blocking()
        one.append((time.perf_counter() - t) * 1000)
    add([event_row(random.Random(salt + i), NOW - timedelta(days=40, seconds=i), "legal")
         for i in range(10_000)])  # a late spool replay: old timestamps
    t = time.perf_counter()
    inc = wh.refresh_blocking()
    inc_ms = (time.perf_counter() - t) * 1000
    t = time.perf_counter()
    wh.refresh_blocking()
    idle_ms = (time.perf_counter() - t) * 1000
    print(f"one new row: {statistics.median(one):.0f} ms; increment: {inc.events} rows in {inc_ms:.0f} ms; "
          f"nothing new: {idle_ms:.0f} ms", flush=True)
    run_id = wh.query("SELECT run_id FROM events WHERE run_id IS NOT NULL LIMIT 1")[0]["run_id"]
    results = []
    for label, f in (("30 days", Filter(since=NOW - timedelta(days=30), until=NOW)),
                     ("30 days, team viewer", Filter(since=NOW - timedelta(days=30), until=NOW, team="legal")),
                     ("90 days", Filter(since=START, until=NOW))):
        for page, fn in pages(wh, f, run_id).items():
            ms, cpu = timed(fn, a.repeat)
            results.append((label, page, ms, cpu))
            print(f"{label:22s} {page:22s} {ms:8.1f} ms  cpu {cpu:8.1f} ms", flush=True)
    wh.close()
    return {"first_s": first_s, "first_events": first.events, "first_outcomes": first.outcomes,
            "one_ms": statistics.median(one), "inc_events": inc.events, "inc_ms": inc_ms, "idle_ms": idle_ms,
            "results": results, "wh_mb": whpath.stat().st_size / 1e6}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--dir", default=".margin/bench-analytics")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", default="")
    ap.add_argument("--scanner-python", default="")
    ap.add_argument("--before-src", default="", help="an earlier margin's src/ directory, measured first")
    ap.add_argument("--before-label", default="an earlier version", help="what --before-src is")
    ap.add_argument("--json-out", default="", help=argparse.SUPPRESS)  # the --before-src child's results
    a = ap.parse_args()
    d = Path(a.dir)
    d.mkdir(parents=True, exist_ok=True)
    db = d / f"ledger-{a.events}.db"
    url = f"sqlite:///{db}"
    began = time.perf_counter()
    fill_s, nruns = asyncio.run(fill(url, a.events))
    print(f"ledger: {a.events} events (filled in {fill_s:.0f} s)" if fill_s else f"ledger: {a.events} events (reused)")
    if a.json_out:  # the child: measure the margin on PYTHONPATH and hand the numbers back
        Path(a.json_out).write_text(json.dumps(measure(a, url, d / f"warehouse-{a.events}-before.duckdb")))
        return
    before: dict[str, Any] = {}
    if a.before_src:
        out = d / "before.json"
        subprocess.run([sys.executable, __file__, "--events", str(a.events), "--dir", str(d), "--repeat",
                        str(a.repeat), "--json-out", str(out)], check=True,
                       env={**os.environ, "PYTHONPATH": a.before_src})
        before = json.loads(out.read_text())
    m = measure(a, url, d / f"warehouse-{a.events}.duckdb")
    scan = scanner(a.scanner_python, str(db)) if a.scanner_python else {}
    for k, v in scan.items():
        print(f"sqlite scanner: {k}: {v:.1f}")
    if a.out:
        update_markdown(Path(a.out), section(a, m, before, scan, db.stat().st_size / 1e6, nruns,
                                             time.perf_counter() - began),
                        "<!-- analytics:start -->", "<!-- analytics:end -->")
        print(f"updated {a.out}")


def section(a: Any, m: dict[str, Any], before: dict[str, Any], scan: dict[str, float], db_mb: float, nruns: int,
            took: float) -> str:
    import duckdb

    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    old = {(lab, page): (ms, cpu) for lab, page, ms, cpu in before.get("results", [])}
    rows = "\n".join(
        f"| {lab} | {page} | " + (f"{old[(lab, page)][0]:.1f} | " if before else "") + f"{ms:.1f} | "
        + (f"{old[(lab, page)][1]:.1f} | " if before else "") + f"{cpu:.1f} |"
        for lab, page, ms, cpu in m["results"])
    head = ("| range | page | wall ms, before | wall ms | CPU ms, before | CPU ms |\n|---|---|---:|---:|---:|---:|"
            if before else "| range | page | wall ms | CPU ms (both threads) |\n|---|---|---:|---:|")
    worst = max(ms for _, _, ms, _ in m["results"])
    worst_cpu = max(cpu for _, _, _, cpu in m["results"])
    scan_txt = "".join(f"\n- DuckDB 1.5.5 sqlite scanner on the same file: {k} = {v:.1f}" for k, v in scan.items())
    was = ""
    if before:
        was = (f"\n- Before ({a.before_label}, `--before-src`, measured first in the same run): first refresh "
               f"{before['first_s']:.1f} s; one new row {before['one_ms']:.0f} ms; {before['inc_events']:,} late rows "
               f"{before['inc_ms']:.0f} ms; nothing new {before['idle_ms']:.0f} ms; slowest page "
               f"{max(ms for _, _, ms, _ in before['results']):.0f} ms wall, "
               f"{max(cpu for _, _, _, cpu in before['results']):.0f} ms CPU")
    extra = scan_txt + was
    return f"""## Analytics warehouse (DuckDB over the ledger)

Dashboard queries over a SQLite ledger of {a.events:,} synthetic events (90 days, 5 teams, 3 models,
~40% of calls in agent runs, outcomes for 90% of runs), copied into the DuckDB warehouse by
`Warehouse.refresh()` through margin's store API.

- Command: `.venv/bin/python bench/analytics_warehouse.py --events {a.events} --repeat {a.repeat}"""\
        + (f" --before-src {a.before_src} --before-label '{a.before_label}'" if before else "") + f"""`
- Date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC (run {took:.0f} s); machine: {os.cpu_count()} CPUs,
  {platform.processor() or platform.machine()}, Python {platform.python_version()}, DuckDB {duckdb.__version__},
  margin commit {rev or '?'} + this change; load average at the end {os.getloadavg()[0]:.1f} (other work shared
  the 2 cores, so wall times are inflated; CPU ms is this process's own work)
- Ledger file {db_mb:.0f} MB, warehouse file {m['wh_mb']:.0f} MB
- First refresh (whole ledger): {m['first_events']:,} events + {m['first_outcomes']:,} outcomes in {m['first_s']:.1f} s
- Refresh after one new call (live traffic): {m['one_ms']:.0f} ms (median of {a.repeat}); {m['inc_events']:,} late
  rows (old timestamps, as a spool replay writes them): {m['inc_ms']:.0f} ms; nothing new: {m['idle_ms']:.0f} ms{extra}
- Page time = its queries one after another, median of {a.repeat} after a warm-up; slowest page: {worst:.0f} ms
  wall, {worst_cpu:.0f} ms CPU (budget: 300 ms)

{head}
{rows}"""


if __name__ == "__main__":
    main()
