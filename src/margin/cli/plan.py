"""`margin plan`: unit economics and capacity for API, self-hosted and hybrid serving.

    margin plan scenario.yaml [--json] [--png DIR]        compare the scenario's options
    margin plan throughput --model M --gpu G --precision P --isl I --osl O [--tp T] [--ttft-slo s] ...
    margin plan from-ledger --since 30d [--config margin.yaml] [--out scenario.yaml]
    margin plan models | gpus | calibration               the catalogues and the fit
"""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from decimal import Decimal
from pathlib import Path
from typing import Any

import typer
import yaml
from typer.core import TyperGroup

from margin.cli.common import CONFIG_OPT, config_or_exit, console, fail, print_json, print_table, since_or_exit


class _DefaultToRun(TyperGroup):
    """`margin plan FILE` means `margin plan run FILE`: a first argument that is not a subcommand is a path."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:  # Any: typer vendors its own click
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


app = typer.Typer(cls=_DefaultToRun, no_args_is_help=True,
                  help="Plan: cost, capacity, energy and break-even of API, self-hosted and hybrid serving. "
                       "`margin plan scenario.yaml` compares a scenario's options.")


def _fmt_usd(v: Any) -> str:
    return "-" if v is None else f"${Decimal(v):,.2f}"


def _read_samples(path: Path) -> Any:
    """Token counts and arrivals of a trace, via margin.replay.traces (Azure CSV, Mooncake, margin JSONL).
    The CLI reads it because planner/ may not import replay/."""
    from margin.planner.scenario import Samples
    from margin.replay.traces import read_trace

    try:
        t = read_trace(path)
    except (OSError, ValueError) as e:
        fail(f"trace {path}: {e}")
        raise
    return Samples([int(x) for x in t.input_tokens], [int(x) for x in t.output_tokens],
                   [float(x) for x in t.arrival_s], path.name)


def load_scenario(path: Path) -> Any:
    from margin.planner.scenario import ScenarioError, build, parse

    if not path.is_file():
        fail(f"{path}: no such scenario file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        fail(f"{path}: not valid YAML: {e}".replace("\n", " "))
        raise
    try:
        sc = parse(data)
        samples = None
        if sc.workload.trace:
            tp = Path(sc.workload.trace)
            tp = tp if tp.is_absolute() else (path.parent / tp)
            if not tp.is_file():
                fail(f"{path}: workload.trace {sc.workload.trace!r}: no such file ({tp})")
            samples = _read_samples(tp)
        return build(sc, samples)
    except ScenarioError as e:
        fail(f"{path}: {e}")
        raise


@app.command("run", hidden=True)
def run(
    scenario: Path = typer.Argument(..., help="scenario.yaml"),
    json: bool = typer.Option(False, "--json", help="Machine-readable output"),
    png: Path | None = typer.Option(None, "--png", help="Write cost-vs-volume and cost-vs-users plots here"),
) -> None:
    """Compare the scenario's options: cost, capacity, latency, energy, break-even, sensitivity."""
    from margin.planner.economics import plan
    from margin.planner.scenario import ScenarioError

    sc = load_scenario(scenario)
    try:
        result = plan(sc)
    except ScenarioError as e:
        fail(f"{scenario}: {e}")
        raise
    if png is not None:
        from margin.planner.plots import save

        try:
            result["plots"] = [str(p) for p in save(sc, png)]
        except RuntimeError as e:
            fail(str(e))
    if json:
        print_json(result)
        return
    w = result["workload"]
    console.print(f"[bold]{result['scenario']}[/]  {w['requests_per_day']:,.0f} requests/day, "
                  f"{w['input_tokens']:,.0f} in / {w['output_tokens']:,.0f} out tokens, "
                  f"{w['tokens_per_month'] / 1e9:,.2f}B tokens/month, peak {w['peak_factor']:.2f}x mean",
                  highlight=False)
    for n in result["notes"]:
        console.print(f"[dim]{n}[/]", highlight=False)
    rows = [{"option": r["option"], "monthly": _fmt_usd(r["monthly_usd"]), "yearly": _fmt_usd(r["yearly_usd"]),
             "$/1M tok": r["usd_per_1m_tokens"], "$/request": r["usd_per_request"], "$/task": r["usd_per_task"],
             "GPUs@peak": r["gpus_peak"] or "-",
             "util": "-" if r["utilisation"] is None else f"{r['utilisation']:.0%}",
             "p99 TTFT s": r["p99_ttft_s"] if r["p99_ttft_s"] is not None else "-",
             "p99 TPOT s": r["p99_tpot_s"] if r["p99_tpot_s"] is not None else "-",
             "kWh/mo": r["kwh_per_month"] if r["kwh_per_month"] is not None else "-",
             "J/tok": r["j_per_token"] if r["j_per_token"] is not None else "-",
             "CO2 kg/mo": r["co2_kg_per_month"] if r["co2_kg_per_month"] is not None else "-"}
            for r in result["options"]]
    print_table(rows, "per option (a month is 30 days, a year 12 months)")
    sens = [{"option": r["option"], "today": _fmt_usd(r["monthly_usd"]),
             **{f"{k} efficiency": _fmt_usd(v) for k, v in r["sensitivity"].items()}} for r in result["options"]]
    print_table(sens, "sensitivity: monthly cost if the same work took 2x, 3x, 5x fewer tokens")
    print_table(result["break_even"], "break-even: beyond requests_per_day, cheaper_above stays the cheaper of a and b",
                ["a", "b", "requests_per_day", "users", "monthly_usd", "cheaper_above", "crossings"])
    for p in result.get("plots", []):
        console.print(f"wrote {p}", highlight=False)


@app.command("throughput")
def throughput_cmd(
    model: str = typer.Option(..., "--model", help="Model id, e.g. llama-3.1-8b (see `margin plan models`)"),
    gpu: str = typer.Option(..., "--gpu", help="Accelerator id, e.g. h100-sxm (see `margin plan gpus`)"),
    gpus: int | None = typer.Option(None, "--gpus", help="Accelerators in total (replicas = gpus / tp)"),
    tp: int = typer.Option(1, "--tp", help="Tensor-parallel degree of one replica"),
    precision: str = typer.Option("bf16", "--precision", help="bf16 | fp8 | int8 | int4 weights"),
    kv_precision: str | None = typer.Option(None, "--kv-precision", help="bf16 | fp8 | int8 (default: as weights)"),
    isl: int = typer.Option(..., "--isl", help="Input tokens per request"),
    osl: int = typer.Option(..., "--osl", help="Output tokens per request"),
    ttft_slo: float | None = typer.Option(None, "--ttft-slo", help="Time-to-first-token SLO, seconds"),
    tpot_slo: float | None = typer.Option(None, "--tpot-slo", help="Time-per-output-token SLO, seconds"),
    prefix_hit: float = typer.Option(0.0, "--prefix-hit", help="Share of input tokens served by the prefix cache"),
    max_batch: int | None = typer.Option(None, "--max-batch", help="Cap on concurrent sequences per replica"),
    json: bool = typer.Option(False, "--json"),
) -> None:
    """Throughput, latency and energy of one deployment at the largest batch meeting the SLOs."""
    from margin.planner.catalog import CatalogError
    from margin.planner.perf import PlannerError, compute_bound_batch, deployment, kv_bytes_per_token, throughput

    try:
        dep = deployment(model, gpu, tp, precision, kv_precision)
        if gpus is not None and (gpus < tp or gpus % tp):
            raise PlannerError(f"--gpus {gpus} must be a multiple of --tp {tp}")
        r = throughput(dep, isl, osl, ttft_slo=ttft_slo, tpot_slo=tpot_slo, prefix_hit=prefix_hit,
                       max_batch=max_batch)
    except (CatalogError, PlannerError) as e:
        fail(str(e))
        raise
    replicas = (gpus or tp) // tp
    out: dict[str, Any] = {
        "model": model, "gpu": gpu, "gpus": replicas * tp, "tp": tp, "replicas": replicas, "precision": precision,
        "kv_precision": dep.kv_dtype, "isl": isl, "osl": osl,
        "output_tokens_per_s": r.output_tokens_per_s * replicas, "input_tokens_per_s": r.input_tokens_per_s * replicas,
        "requests_per_s": r.requests_per_s * replicas, "ttft_s": r.ttft_s, "tpot_s": r.tpot_s,
        "latency_s": r.latency_s, "batch": r.batch, "batch_per_replica": r.batch, "max_batch_kv": r.max_batch_kv,
        "limited_by": r.limited_by, "meets_slo": r.meets_slo, "joules_per_token": r.joules_per_token,
        "power_w": r.power_w * replicas, "kv_bytes_per_token": kv_bytes_per_token(dep),
        "kv_capacity_tokens": r.kv_capacity_tokens, "compute_bound_batch": compute_bound_batch(dep),
        "usd_per_1m_output_tokens": str((dep.gpu.usd_per_hour * tp * Decimal(1_000_000)
                                         / (Decimal(3600) * Decimal(f"{r.output_tokens_per_s:.6g}")))
                                        .quantize(Decimal("0.0001"))),
    }
    if json:
        print_json(out)
        return
    print_table([{"metric": k, "value": f"{v:,.4g}" if isinstance(v, float) else v} for k, v in out.items()],
                f"{model} on {replicas * tp} x {gpu} (tp {tp}, {precision})")
    if not r.meets_slo:
        console.print("[yellow]the SLO cannot be met even at batch 1; figures are for batch 1[/]")


@app.command("models")
def models_cmd(json: bool = typer.Option(False, "--json")) -> None:
    """The model catalogue (architecture, source, date)."""
    from dataclasses import asdict

    from margin.planner.catalog import models

    rows = [asdict(m) for m in models().values()]
    if json:
        print_json(rows)
        return
    print_table([{"id": r["id"], "params_B": round(r["params"] / 1e9, 2),
                  "active_B": round(r["active_params"] / 1e9, 2),
                  "layers": r["layers"], "hidden": r["hidden"], "heads": r["heads"], "kv_heads": r["kv_heads"],
                  "head_dim": r["head_dim"], "context": r["context"], "date": r["date"]} for r in rows], "models")


@app.command("gpus")
def gpus_cmd(json: bool = typer.Option(False, "--json")) -> None:
    """The accelerator catalogue (peak dense FLOP/s, memory, bandwidth, power, prices)."""
    from margin.planner.catalog import gpus

    rows = [{"id": g.id, "name": g.name, "bf16_tflops": g.flops["bf16"] / 1e12,
             "fp8_tflops": g.flops.get("fp8", 0) / 1e12 or None, "hbm_gb": g.hbm_bytes / 1e9,
             "hbm_tb_s": g.hbm_bw / 1e12, "link_gb_s": g.interconnect_bw / 1e9, "tdp_w": g.tdp_w,
             "usd_per_hour": str(g.usd_per_hour), "owned_3y_usd": str(g.owned_3y_usd), "source": g.source,
             "date": g.date} for g in gpus().values()]
    if json:
        print_json(rows)
        return
    print_table([{k: v for k, v in r.items() if k != "source"} for r in rows], "accelerators")


@app.command("calibration")
def calibration_cmd(json: bool = typer.Option(False, "--json"), refit: bool = typer.Option(
        False, "--refit", help="Fit again and show that fit (does not change the shipped factors)")) -> None:
    """Measured vs predicted for every calibration point (ANCHORS.md section 4), and the fitted factors."""
    from dataclasses import asdict

    from margin.planner.calibrate import fit, table
    from margin.planner.perf import fitted

    eff = fit()[0] if refit else fitted()
    rows = table(eff)
    if json:
        print_json({"factors": asdict(eff), "rows": rows})
        return
    console.print(f"factors: {asdict(eff)}", highlight=False)
    print_table([{**r, "measured": f"{r['measured']:.4g}", "predicted": f"{r['predicted']:.4g}",
                  "ratio": f"{r['ratio']:.3f}"} for r in rows], "calibration")


@app.command("from-ledger")
def from_ledger(
    config: Path = CONFIG_OPT,
    since: str = typer.Option("30d", help="30m, 24h, 7d, 2w or an ISO date"),
    out: Path = typer.Option(Path("scenario.yaml"), "--out", "-o", help="Where to write the scenario"),
    json: bool = typer.Option(False, "--json"),
) -> None:
    """Build a scenario from metered traffic (the ledger), to edit and then `margin plan` it."""
    from datetime import UTC, datetime

    from margin.ledger import open_store

    cfg = config_or_exit(config)
    start = since_or_exit(since)

    async def fetch() -> list[dict[str, Any]]:
        store = open_store(cfg.ledger.url)
        await store.open()
        try:
            return await store.fetch_events(since=start)
        finally:
            await store.close()

    rows = [r for r in asyncio.run(fetch()) if (r.get("status") or 200) < 400 and (r.get("input_tokens") or 0) > 0]
    if not rows:
        fail(f"no successful metered calls since {start.isoformat()} in {cfg.ledger.url}")
    doc = scenario_from_events(rows, start, datetime.now(UTC), {m.name: m for m in cfg.models})
    out.write_text("# Built by `margin plan from-ledger`; edit the options, then run `margin plan "
                   f"{out.name}`.\n" + yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    if json:
        print_json({"written": str(out), "scenario": doc})
        return
    w = doc["workload"]
    console.print(f"wrote {out}: {w['requests_per_day']:,} requests/day, {w['input_tokens']['mean']} in / "
                  f"{w['output_tokens']['mean']} out tokens, {len(doc['options'])} options", highlight=False)


def scenario_from_events(rows: list[dict[str, Any]], start: Any, end: Any,
                         configured: dict[str, Any]) -> dict[str, Any]:
    """A scenario document from ledger rows: volume, token shape, hourly curve, agent calls, cache use."""
    from datetime import datetime

    days = max((end - start).total_seconds() / 86400, 1 / 24)
    first = min(datetime.fromisoformat(r["ts_start"]) for r in rows)
    span_days = max((end - first).total_seconds() / 86400, 1 / 24)
    days = min(days, span_days)  # a ledger younger than --since: rate over the time it has existed
    ins = sorted(int(r["input_tokens"] or 0) for r in rows)
    outs = sorted(int(r["output_tokens"] or 0) for r in rows)
    cached = sum(int(r.get("cached_input_tokens") or 0) for r in rows)
    hours = Counter(datetime.fromisoformat(r["ts_start"]).hour for r in rows)
    runs = Counter(r["run_id"] for r in rows if r.get("run_id"))
    calls_per_task = round(sum(runs.values()) / len(runs), 2) if runs else 1.0
    cache_hits = sum(1 for r in rows if r.get("cache_hit"))

    def p99(v: list[int]) -> int:
        return v[min(len(v) - 1, math.ceil(0.99 * len(v)) - 1)]

    curve = [hours.get(h, 0) for h in range(24)]
    models = Counter(r.get("model") or "unknown" for r in rows)
    spend = sum(Decimal(str(r.get("cost_usd") or "0")) for r in rows)
    options: list[dict[str, Any]] = []
    for name, _n in models.most_common(4):
        m = configured.get(name)
        ref = getattr(getattr(m, "price", None), "genai_prices", None) if m else None
        pm = getattr(getattr(m, "price", None), "per_million", None) if m else None
        if ref:
            options.append({"kind": "api", "name": f"{name} (as today)", "model": ref})
        elif pm is not None:
            options.append({"kind": "api", "name": f"{name} (as today)", "price_per_million": {
                "input": str(pm.input), "output": str(pm.output),
                **({"cache_read": str(pm.cache_read)} if pm.cache_read is not None else {})}})
    options.append({"kind": "self_hosted", "name": "llama-3.1-8b on H100 (fp8)", "model": "llama-3.1-8b",
                    "gpu": "h100-sxm", "precision": "fp8", "ttft_slo_s": 1.0, "tpot_slo_s": 0.05})
    options.append({"kind": "self_hosted", "name": "llama-3.1-70b on 2xH100 (fp8)", "model": "llama-3.1-70b",
                    "gpu": "h100-sxm", "tp": 2, "precision": "fp8", "ttft_slo_s": 1.0, "tpot_slo_s": 0.05})
    return {
        "name": f"from ledger since {start:%Y-%m-%d}",
        "description": (f"{len(rows)} successful calls over {days:.2f} days, metered spend ${spend:.2f} "
                        f"(${spend / Decimal(f'{days:.6f}') * 30:.2f} per 30 days)"),
        "workload": {
            "requests_per_day": round(len(rows) / days),
            "input_tokens": {"mean": round(sum(ins) / len(ins), 1), "p99": p99(ins)},
            "output_tokens": {"mean": round(max(1, sum(outs)) / len(outs), 1), "p99": max(1, p99(outs))},
            "diurnal": curve if sum(curve) > 0 and days >= 1 else "flat",
            "calls_per_task": max(1.0, calls_per_task),
            "prefix_hit_rate": round(min(0.99, cached / max(1, sum(ins))), 4),
            "cache_hit_rate": round(min(0.99, cache_hits / len(rows)), 4),
        },
        "options": options,
    }
