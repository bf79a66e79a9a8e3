"""Replay throughput: policy replay of a 1,000,000-request trace resampled from Azure conv (target:
under 30 s), the sequential budget path, and the serving simulator on 100,000 requests.

    .venv/bin/python bench/replay_bench.py --out BENCHMARKS.md

Writes (or replaces) the `<!-- replay:start -->` ... `<!-- replay:end -->` section of --out and
bench/results/replay.json. Timings are wall clock on this machine, one run each, in one process."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from margin.planner.perf import deployment  # noqa: E402
from margin.replay.engine import replay  # noqa: E402
from margin.replay.policy import load_policy, policy_from_dict  # noqa: E402
from margin.replay.sim import SimConfig, Simulator  # noqa: E402
from margin.replay.summary import summarise  # noqa: E402
from margin.replay.traces import read_trace, resample  # noqa: E402

DATA = Path(os.environ.get("MARGIN_SHARED_DATA", ROOT.parent / "shared" / "data")) / "traces"
START, END = "<!-- replay:start -->", "<!-- replay:end -->"
BUDGET_POLICY: dict[str, Any] = {
    "providers": [{"name": "openai", "kind": "openai", "base_url": "https://api.openai.com/v1"}],
    "models": [{"name": "gpt-4o-mini", "provider": "openai", "price": {"genai_prices": "openai/gpt-4o-mini"},
                "context_window": 128000},
               {"name": "gpt-4o", "provider": "openai", "price": {"genai_prices": "openai/gpt-4o"},
                "context_window": 128000}],
    "budgets": [{"id": "per-team-daily", "scope": {"team": "*"}, "limit_usd": "400", "period": "day",
                 "thresholds": [{"at": 50, "action": "notify"},
                                {"at": 80, "action": "downgrade", "map": {"gpt-4o": "gpt-4o-mini"}},
                                {"at": 100, "action": "block"}]}],
    "replay": {"model": "gpt-4o", "attribution": {"org": "acme", "team": "search"},
               "start": "2026-11-02T00:00:00Z"},
}


def timed(fn: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = "?", ""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{os.cpu_count()} CPUs, {cpu}, Python {platform.python_version()}, margin commit {commit}"
            + (" (working tree modified)" if dirty else "") + f"; load average {load:.1f} at the end of the run"
            + (" (other work shared the machine: expect slower, noisier numbers)" if load > 1.5 else ""))


def run(n_policy: int, n_budget: int, n_sim: int) -> dict[str, Any]:
    conv, read_s = timed(lambda: read_trace(DATA / "azure2023_conv.csv"))
    big, resample_s = timed(lambda: resample(conv, n_policy, seed=1))
    out: dict[str, Any] = {"trace": {"source": "azure2023_conv.csv", "rows": len(conv), "read_s": read_s,
                                     "resampled_to": n_policy, "resample_s": resample_s}, "policy": [], "sim": []}
    csv = ROOT / ".margin" / "bench" / "azure_conv_1m.csv"
    csv.parent.mkdir(parents=True, exist_ok=True)
    with csv.open("w") as f:  # the same million requests as a file, to time the reader too
        f.write("TIMESTAMP,ContextTokens,GeneratedTokens\n")
        t0 = conv.start.timestamp() if conv.start else 0.0
        for t, i, o in zip(big.arrival_s.tolist(), big.input_tokens.tolist(), big.output_tokens.tolist(), strict=True):
            f.write(f"{datetime.fromtimestamp(t0 + t, UTC):%Y-%m-%d %H:%M:%S.%f},{i},{o}\n")
    again, read_big_s = timed(lambda: read_trace(csv))
    out["trace"]["read_1m_csv_s"] = read_big_s
    csv.unlink()
    for name in ("strong", "rules", "rules_cache"):
        pol = load_policy(ROOT / "docs" / "replay" / f"{name}.yaml")
        o, replay_s = timed(lambda pol=pol: replay(big, pol))
        r, sum_s = timed(lambda o=o: summarise(o))
        total = replay_s + sum_s
        out["policy"].append({"policy": f"docs/replay/{name}.yaml", "requests": n_policy, "replay_s": replay_s,
                              "summary_s": sum_s, "total_s": total, "requests_per_s": n_policy / total,
                              "cost_usd": r["cost_usd"], "decide_calls": r["decide_calls"]})
        print(f"policy {name}: {total:.2f} s ({n_policy / total:,.0f} req/s)", flush=True)
    small = resample(conv, n_budget, seed=2)
    pol = policy_from_dict(BUDGET_POLICY, "budget (per-team daily, downgrade at 80%, block at 100%)")
    o, replay_s = timed(lambda: replay(small, pol))
    r, sum_s = timed(lambda: summarise(o))
    total = replay_s + sum_s
    out["policy"].append({"policy": pol.name, "requests": n_budget, "replay_s": replay_s, "summary_s": sum_s,
                          "total_s": total, "requests_per_s": n_budget / total, "cost_usd": r["cost_usd"],
                          "blocked": r["blocked"], "downgraded": r["downgraded"]})
    print(f"budgets: {total:.2f} s ({n_budget / total:,.0f} req/s)", flush=True)
    dep = deployment("llama-3.1-8b", "h100-sxm")
    sim_trace = resample(conv, n_sim, seed=3)
    for scale, replicas in ((1, 1), (10, 4)):
        t = sim_trace.scaled(scale) if scale != 1 else sim_trace
        res, s = timed(lambda t=t, replicas=replicas: Simulator(dep, SimConfig(replicas=replicas)).run(t))
        out["sim"].append({"requests": n_sim, "rate_scale": scale, "replicas": replicas, "elapsed_s": s,
                           "requests_per_s": n_sim / s, "steps": res.steps, "steps_per_s": res.steps / s,
                           "simulated_s": res.span_s, "ttft_p99_s": res.ttft_s["p99"],
                           "tpot_p99_s": res.tpot_s["p99"]})
        print(f"sim {scale}x on {replicas}: {s:.1f} s ({n_sim / s:,.0f} req/s, {res.steps:,} steps)", flush=True)
    assert len(again) == n_policy
    return out


def render(res: dict[str, Any], command: str, started: datetime, wall_s: float) -> str:
    tr = res["trace"]
    lines = [START, "## Replay throughput", "",
             "Policy replay runs the gateway's own policy functions (`route.decide` once per distinct feature "
             "combination, exact Decimal pricing grouped by identical token counts); the budget path plans, "
             "reserves and settles every request in arrival order. The simulator prices every continuous-batching "
             "step with the planner's `step_time_s` (Llama-3.1-8B on H100).", "",
             f"- Command: `{command}`",
             f"- Date: {started:%Y-%m-%d %H:%M} UTC (whole run {wall_s:.0f} s)",
             f"- Machine: {machine()}",
             f"- Trace: Azure conv ({tr['rows']:,} rows, read in {tr['read_s']:.2f} s) resampled to "
             f"{tr['resampled_to']:,} requests in {tr['resample_s']:.2f} s; reading the same million requests "
             f"back from a CSV takes {tr['read_1m_csv_s']:.1f} s (not included below)", "",
             "| policy | requests | replay s | summary s | total s | requests/s | cost USD |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for p in res["policy"]:
        lines.append(f"| {p['policy']} | {p['requests']:,} | {p['replay_s']:.2f} | {p['summary_s']:.2f} | "
                     f"{p['total_s']:.2f} | {p['requests_per_s']:,.0f} | {float(p['cost_usd']):,.2f} |")
    lines += ["", "| simulator | requests | replicas | wall s | requests/s | steps | steps/s | simulated time | "
              "TTFT p99 s | TPOT p99 ms |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in res["sim"]:
        lines.append(f"| {s['rate_scale']}x rate | {s['requests']:,} | {s['replicas']} | {s['elapsed_s']:.1f} | "
                     f"{s['requests_per_s']:,.0f} | {s['steps']:,} | {s['steps_per_s']:,.0f} | "
                     f"{s['simulated_s'] / 3600:.1f} h | {s['ttft_p99_s']:.2f} | {s['tpot_p99_s'] * 1e3:.0f} |")
    lines += ["", END]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    ap.add_argument("--requests", type=int, default=1_000_000)
    ap.add_argument("--budget-requests", type=int, default=100_000)
    ap.add_argument("--sim-requests", type=int, default=100_000)
    a = ap.parse_args()
    started = datetime.now(UTC)
    t0 = time.perf_counter()
    res = run(a.requests, a.budget_requests, a.sim_requests)
    wall = time.perf_counter() - t0
    command = ".venv/bin/python bench/replay_bench.py --out BENCHMARKS.md"
    section = render(res, command, started, wall)
    results = ROOT / "bench" / "results" / "replay.json"
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps({"date": started.isoformat(), "machine": machine(), **res}, indent=2,
                                  default=str) + "\n")
    text = a.out.read_text() if a.out.exists() else "# margin benchmarks\n"
    if START in text and END in text:
        text = text[:text.index(START)] + section + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    a.out.write_text(text)
    print(f"wrote {a.out} and {results}")


if __name__ == "__main__":
    main()
