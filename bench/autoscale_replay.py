"""Replay proof of the autoscaling advice (docs/selfhosted.md): the Azure 2023 conversation trace on
a simulated pool whose replica count follows `planner.autoscale`, against the fewest fixed replicas
that meet the same SLO. Both are billed per replica-hour at the catalogue price.

    .venv/bin/python bench/autoscale_replay.py --thin 1 --out bench/results/autoscale_replay.json

--thin N keeps every Nth request (a scaled-down trace with its real timing: the test uses N=6).
Prints a table and the markdown block docs/selfhosted.md quotes; writes the JSON (timeline included)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from margin.planner.autoscale import make_spec  # noqa: E402
from margin.replay.autoscale import ControlConfig, compare  # noqa: E402
from margin.replay.traces import read_trace  # noqa: E402

DATA = Path(os.environ.get("MARGIN_SHARED_DATA", ROOT.parent / "shared" / "data"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", type=Path, default=DATA / "traces" / "azure2023_conv.csv")
    ap.add_argument("--thin", type=int, default=1, help="keep every Nth request")
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--gpu", default="l4")
    ap.add_argument("--ttft-slo", type=float, default=2.0)
    ap.add_argument("--tpot-slo", type=float, default=0.1)
    ap.add_argument("--pct", default="p99")
    ap.add_argument("--target-utilisation", type=float, default=None, help="default: the config default")
    ap.add_argument("--interval", type=float, default=15.0)
    ap.add_argument("--window", type=float, default=60.0)
    ap.add_argument("--scale-down-after", type=float, default=300.0)
    ap.add_argument("--startup", type=float, default=60.0)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "autoscale_replay.json")
    a = ap.parse_args()
    if a.thin < 1:
        ap.error("--thin must be >= 1")
    trace = read_trace(a.trace)
    if a.thin > 1:
        trace = trace.take(np.arange(0, len(trace), a.thin))
    spec = make_spec(a.model, a.gpu, ttft_slo_s=a.ttft_slo, tpot_slo_s=a.tpot_slo, percentile=a.pct,
                     lead_s=a.startup, **({"target_utilisation": a.target_utilisation}
                                         if a.target_utilisation is not None else {}))
    control = ControlConfig(interval_s=a.interval, window_s=a.window, scale_down_after_s=a.scale_down_after,
                            startup_s=a.startup)
    started = datetime.now(UTC)
    t0 = time.perf_counter()
    c = compare(trace, spec, control=control, pct=a.pct)
    wall = time.perf_counter() - t0
    d = c.to_dict()
    auto = d["autoscaled"]
    cmd = (f".venv/bin/python bench/autoscale_replay.py --thin {a.thin}" + (f" --gpu {a.gpu}" if a.gpu != "l4" else "")
           + (f" --target-utilisation {a.target_utilisation:g}" if a.target_utilisation is not None else ""))
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or platform.machine()

    def row(label: str, p: dict[str, object] | None) -> str:
        if p is None:
            return f"| {label} | none meets the SLO | | | | | |"
        ttft, tpot = p["ttft_s"], p["tpot_s"]
        assert isinstance(ttft, dict) and isinstance(tpot, dict)
        return (f"| {label} | {p['replicas']} | {float(p['replica_hours']):.2f} | {p['cost_usd']} | "  # type: ignore[arg-type]
                f"{ttft[a.pct]:.3f} | {tpot[a.pct]:.4f} | {'yes' if p['slo_met'] else 'no'} |")

    def saving(key: str, p: dict[str, object] | None) -> str:
        if p is None or d[key] is None:
            return "n/a"
        share = 1 - auto["replica_hours"] / float(p["replica_hours"])  # type: ignore[arg-type]
        return f"${d[key]} ({share * 100:.1f}% of its replica-hours)"

    lo, hi = d["peak_window_s"]
    lines = [
        f"- Command: `{cmd}` ({wall:.0f} s wall; {started:%Y-%m-%d %H:%M} UTC; {cpu}, {os.cpu_count()} CPUs)",
        f"- Trace: {a.trace.name}, {'every request' if a.thin == 1 else f'every {a.thin}th request'}: "
        f"{len(trace)} requests over "
        f"{trace.duration_s / 60:.0f} min ({trace.rate_per_s:.2f} req/s mean); busiest 10 min: {lo / 60:.0f}-"
        f"{hi / 60:.0f} min",
        f"- Pool: {a.model} on {a.gpu} at ${spec.usd_per_replica_hour}/replica-hour; SLO {a.pct} TTFT <= "
        f"{a.ttft_slo:g} s and TPOT <= {a.tpot_slo:g} s; target utilisation {spec.target_utilisation:g}; "
        f"advice every {a.interval:g} s over {a.window:g} s, "
        f"scale-down after {a.scale_down_after:g} s, cold start {a.startup:g} s",
        "",
        f"| pool | replicas | replica-hours | cost USD | {a.pct} TTFT s | {a.pct} TPOT s | SLO met (whole trace) |",
        "|---|---:|---:|---:|---:|---:|:---:|",
        row("fixed, sized for the busiest 10 min", d["peak_sized"]),
        row("fixed, fewest meeting the SLO over the trace (hindsight)", d["oracle"]),
        f"| following the advice | {min(e['billed'] for e in auto['timeline'])}-{auto['peak_replicas']} "
        f"(mean {auto['mean_replicas']:.2f}) | {auto['replica_hours']:.2f} | {auto['cost_usd']} | "
        f"{auto['ttft_s'][a.pct]:.3f} | {auto['tpot_s'][a.pct]:.4f} | {'yes' if c.slo_met_autoscaled else 'no'} |",
        "",
        f"Saving against the peak-sized pool: {saving('saving_vs_peak_sized_usd', d['peak_sized'])}; against the "
        f"hindsight pool: {saving('saving_vs_oracle_usd', d['oracle'])}.",
    ]
    text = "\n".join(lines)
    print(text)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"date": started.isoformat(), "command": cmd, "wall_s": wall, **d}, indent=1,
                                default=str))


if __name__ == "__main__":
    main()
