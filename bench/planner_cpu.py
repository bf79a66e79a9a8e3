"""Measure "this CPU" for the planner's catalogue: peak matmul FLOP/s and memory bandwidth.

    .venv/bin/python bench/planner_cpu.py            # prints the entry
    .venv/bin/python bench/planner_cpu.py --write    # writes src/margin/planner/data/this_cpu.yaml

FLOP/s: best of several float32 matmuls (numpy's BLAS, all cores), taken as the CPU's bf16 and fp32
rate (CPUs without AMX have no faster bf16 path). Bandwidth: best of several 1 GiB array copies,
counting read + write bytes. Power and prices are nominal (a VM exposes no power counters).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from datetime import date
from pathlib import Path

import numpy as np
import yaml

OUT = Path(__file__).resolve().parents[1] / "src" / "margin" / "planner" / "data" / "this_cpu.yaml"


def matmul_flops(n: int = 2048, reps: int = 7) -> float:
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
    a @ b  # warm up
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2.0 * n**3 / best


def copy_bandwidth(nbytes: int = 1 << 30, reps: int = 5) -> float:
    src = np.ones(nbytes // 8, dtype=np.float64)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return 2.0 * nbytes / best


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def mem_bytes() -> float:
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    flops = matmul_flops()
    bw = copy_bandwidth()
    cores = os.cpu_count() or 1
    entry = {"this-cpu": {
        "name": f"{cpu_name()} ({cores} cores)",
        "flops": {"bf16": float(f"{flops:.4g}"), "fp32": float(f"{flops:.4g}")},
        "hbm_bytes": float(f"{mem_bytes():.4g}"),
        "hbm_bw": float(f"{bw:.4g}"),
        "interconnect_bw": 0,
        "tdp_w": 35, "idle_w": 10,
        "usd_per_hour": "0.10", "owned_3y_usd": "1000",
        "source": ("measured: float32 numpy matmul 2048^3 (best of 7) and 1 GiB np.copyto (read+write, best of 5); "
                   "power and prices nominal"),
        "date": date.today().isoformat(),
        "command": "python bench/planner_cpu.py --write",
    }}
    text = yaml.safe_dump(entry, sort_keys=False)
    print(text)
    if args.write:
        OUT.write_text("# Written by bench/planner_cpu.py on this machine. Re-run it on another machine.\n" + text)
        print("wrote", OUT)


if __name__ == "__main__":
    main()
