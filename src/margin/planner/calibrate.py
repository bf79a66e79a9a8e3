"""Fit the performance model's efficiency factors to the measurements in data/calibration.yaml.

Least squares on log(predicted / measured), so a 20% miss counts the same on a 37 ms TPOT as on a
28,000 tok/s throughput. Four factors are fitted (HBM efficiency, compute efficiency, roofline
overlap, per-step overhead); comm latency and comm efficiency stay fixed, since every TP>1
measurement also shares the per-step overhead and the two cannot be told apart. Predictions are
always `step_time_s` / `throughput` outputs: a measurement only enters through the fit.

`python -m margin.planner.calibrate [--write]` prints the table (and rewrites data/efficiency.yaml).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass, replace
from datetime import date
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from margin.planner.catalog import gpu, model
from margin.planner.perf import Deployment, Efficiency, Step, fitted, prefill_step, step_time_s, throughput

FITTED = ("eta_mem", "eta_compute", "overlap", "step_overhead_s")
BOUNDS = {"eta_mem": (0.3, 1.0), "eta_compute": (0.1, 1.0), "overlap": (0.0, 1.0), "step_overhead_s": (0.0, 0.0005)}
UNITS = {"prefill": "s", "tpot": "s", "throughput": "tok/s", "energy": "J/tok"}


@dataclass(frozen=True)
class Point:
    id: str
    kind: str
    dep: Deployment
    isl: int
    osl: int
    batch: int
    measured: float
    fit: bool
    source: str


def points() -> list[Point]:
    raw: list[dict[str, Any]] = yaml.safe_load(
        resources.files("margin.planner").joinpath("data", "calibration.yaml").read_text(encoding="utf-8"))
    out = []
    for r in raw:
        dep = Deployment(model(r["model"]), gpu(r["gpu"]), int(r.get("tp", 1)), r.get("precision", "bf16"),
                         r.get("kv_precision"))
        out.append(Point(r["id"], r["kind"], dep, int(r["isl"]), int(r.get("osl", 1)), int(r.get("batch", 1)),
                         float(r["measured"]), bool(r.get("fit", True)), str(r.get("source", ""))))
    return out


def predict(p: Point, eff: Efficiency) -> float:
    """The model's honest prediction for one measurement's conditions."""
    if p.kind == "prefill":
        return step_time_s(p.dep, prefill_step(p.isl), eff)
    if p.kind == "tpot":
        ctx = p.isl + p.osl // 2
        return step_time_s(p.dep, Step(decode_seqs=p.batch, decode_ctx=p.batch * ctx), eff)
    if p.kind == "throughput":
        return throughput(p.dep, p.isl, p.osl, eff=eff).output_tokens_per_s
    if p.kind == "energy":
        return throughput(p.dep, p.isl, p.osl, max_batch=p.batch, eff=eff).joules_per_token
    raise ValueError(f"{p.id}: unknown kind {p.kind!r}")


def fit(pts: list[Point] | None = None) -> tuple[Efficiency, float]:
    """Least-squares fit of the FITTED factors; returns them and the RMS log error."""
    from scipy.optimize import least_squares

    pts = [p for p in (pts or points()) if p.fit]
    base = Efficiency()

    def eff_of(x: Any) -> Efficiency:
        return replace(base, **dict(zip(FITTED, (float(v) for v in x), strict=True)))

    def residuals(x: Any) -> list[float]:
        e = eff_of(x)
        return [math.log(predict(p, e) / p.measured) for p in pts]

    x0 = [getattr(base, k) for k in FITTED]
    lo = [BOUNDS[k][0] for k in FITTED]
    hi = [BOUNDS[k][1] for k in FITTED]
    best = None
    # throughput() picks integer batches, so the objective is piecewise smooth: try a few starts.
    for start in (x0, [0.6, 0.4, 0.0, 1e-4], [0.9, 0.6, 0.6, 2e-5]):
        r = least_squares(residuals, start, bounds=(lo, hi), diff_step=1e-3)
        if best is None or r.cost < best.cost:
            best = r
    assert best is not None
    e = eff_of(best.x)
    rms = math.sqrt(sum(v * v for v in residuals(best.x)) / len(pts))
    return e, rms


def table(eff: Efficiency | None = None) -> list[dict[str, Any]]:
    e = eff or fitted()
    rows = []
    for p in points():
        pred = predict(p, e)
        rows.append({"id": p.id, "kind": p.kind, "unit": UNITS[p.kind], "measured": p.measured, "predicted": pred,
                     "ratio": pred / p.measured, "fitted_on": p.fit, "source": p.source})
    return rows


def write(eff: Efficiency, rms: float, path: Path | None = None) -> Path:
    target = path or Path(str(resources.files("margin.planner").joinpath("data", "efficiency.yaml")))
    d = asdict(eff)
    body = {"fitted": list(FITTED), "rms_log_error": round(rms, 4), "date": date.today().isoformat(),
            "command": "python -m margin.planner.calibrate --write",
            "factors": {k: float(f"{v:.5g}") for k, v in d.items()}}
    target.write_text("# Written by margin.planner.calibrate: fitted to data/calibration.yaml (ANCHORS.md section 4).\n"
                      + yaml.safe_dump(body, sort_keys=False), encoding="utf-8")
    return target


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--write", action="store_true", help="rewrite data/efficiency.yaml with the fit")
    args = ap.parse_args()
    e, rms = fit()
    print(f"fitted: {e}  rms log error {rms:.4f}")
    for r in table(e):
        print(f"{r['id']:32s} {r['measured']:>12.4g} {r['predicted']:>12.4g} {r['ratio']:6.3f}"
              f"{'' if r['fitted_on'] else '  (check, not fitted)'}")
    if args.write:
        print("wrote", write(e, rms))


if __name__ == "__main__":
    main()
