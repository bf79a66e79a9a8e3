"""Serving-simulation results for people and machines: rows, rich tables, PNG charts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from margin.replay.sim import SimResult


def sim_row(scale: float, r: SimResult, fewest: int | None = None, tried: list[int] | None = None,
            bound: int | None = None) -> dict[str, Any]:
    row: dict[str, Any] = {"rate_scale": scale, **r.to_dict()}
    if tried is not None:
        row["fewest_replicas"] = fewest
        row["replicas_tried"] = tried
        row["analytic_lower_bound"] = bound
    return row


def print_sim(console: Console, head: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    tr, slo = head["trace"], head["slo"]
    console.print(f"[bold]{head['model']}[/] on {head['tp']} x [bold]{head['gpu']}[/] ({head['precision']}) per "
                  f"replica, serving [bold]{tr['name']}[/] ({tr['requests']:,} requests, {tr['rate_per_s']} req/s at "
                  f"1x); scheduler {head['scheduler']}", highlight=False)
    t = Table(title="simulated serving" + (f" - SLO {slo['percentile']} TTFT <= {slo['ttft_s']} s, TPOT <= "
                                           f"{slo['tpot_s']} s" if slo["ttft_s"] or slo["tpot_s"] else ""),
              title_justify="left")
    cols = ["rate", "replicas", "TTFT p50/p90/p99 s", "TPOT p50/p90/p99 ms", "busy", "preempt", "prefix hit",
            "out tok/s", "J/out tok", "USD", "USD/M out"]
    for c in cols:
        t.add_column(c, justify="right")
    for r in rows:
        ttft, tpot = r["ttft_s"], r["tpot_s"]
        reps = f"{r['replicas']}" + ("" if r.get("fewest_replicas", r["replicas"]) == r["replicas"] else " (none met)")
        t.add_row(f"{r['rate_scale']:g}x", reps, f"{ttft['p50']:.3f}/{ttft['p90']:.3f}/{ttft['p99']:.3f}",
                  f"{tpot['p50'] * 1e3:.1f}/{tpot['p90'] * 1e3:.1f}/{tpot['p99'] * 1e3:.1f}",
                  f"{r['gpu_utilisation']:.0%}", f"{r['preemptions']:,}", f"{r['prefix_hit_share']:.1%}",
                  f"{r['output_tokens_per_s']:,.0f}", f"{r['joules_per_output_token']:.3f}",
                  f"{float(r['cost_usd']):,.2f}",
                  f"{float(r['usd_per_million_output']):.3f}" if r["usd_per_million_output"] else "")
    console.print(t)
    for r in rows:
        if r["rejected"]:
            console.print(f"[yellow]{r['rate_scale']:g}x: {r['rejected']:,} requests are longer than "
                          f"{head['model']}'s context or one replica's KV cache: never served, so no SLO is met[/]",
                          highlight=False)
        if "fewest_replicas" in r:
            console.print(f"{r['rate_scale']:g}x: fewest replicas meeting the SLO: {r['fewest_replicas'] or 'none'} "
                          f"(analytic lower bound {r['analytic_lower_bound']}; simulated {r['replicas_tried']})",
                          highlight=False)
    ll = rows[0]["littles_law"]
    console.print(f"[dim]Little's law check ({rows[0]['rate_scale']:g}x): lambda W = {ll['lambda_w']:.2f}, mean in "
                  f"system seen by arrivals = {ll['mean_in_system_seen_by_arrivals']:.2f}; simulated "
                  f"{sum(r['steps'] for r in rows):,} steps in {sum(r['elapsed_s'] for r in rows):.1f} s[/]",
                  highlight=False)


def plot_sim(rows: list[dict[str, Any]], results: list[SimResult], head: dict[str, Any], out_dir: Path,
             stem: str | None = None) -> list[Path]:
    """TTFT and TPOT CDFs per rate scale, and replicas per rate scale (with --find-replicas)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from margin.replay.report import slug

    out_dir.mkdir(parents=True, exist_ok=True)
    stem = stem or f"replay_sim_{slug(head['trace']['name'])}"
    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    slo = head["slo"]
    for row, res in zip(rows, results, strict=True):
        label = f"{row['rate_scale']:g}x, {row['replicas']} replicas"
        for ax, key in zip(axes, ("ttft", "tpot"), strict=True):
            x = np.sort(res.per_request[key])
            if x.size:
                ax.plot(x, np.arange(1, x.size + 1) / x.size, label=label)
    for ax, name, limit in ((axes[0], "TTFT (s)", slo["ttft_s"]), (axes[1], "TPOT (s)", slo["tpot_s"])):
        ax.set_xscale("log")
        ax.set_xlabel(name)
        ax.set_ylabel("share of requests")
        if limit:
            ax.axvline(limit, color="k", linestyle="--", linewidth=1)
        ax.legend(fontsize=8)
    fig.suptitle(f"{head['model']} on {head['gpu']}: {head['trace']['name']}")
    fig.tight_layout()
    p = out_dir / f"{stem}_latency.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)
    if all("fewest_replicas" in r for r in rows) and len(rows) > 1:
        fig, ax = plt.subplots(figsize=(6, 4))
        xs = [r["rate_scale"] for r in rows]
        ax.plot(xs, [r["fewest_replicas"] or np.nan for r in rows], marker="o", label="simulated (SLO met)")
        ax.plot(xs, [r["analytic_lower_bound"] for r in rows], marker="x", linestyle="--", label="analytic bound")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("trace rate scale")
        ax.set_ylabel(f"{head['gpu']} replicas")
        ax.set_title(f"fewest replicas: {slo['percentile']} TTFT <= {slo['ttft_s']} s, TPOT <= {slo['tpot_s']} s")
        ax.legend()
        fig.tight_layout()
        p = out_dir / f"{stem}_replicas.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    return paths
