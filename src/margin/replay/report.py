"""Replay results for people: rich tables, and PNG charts (matplotlib, the `plots` extra)."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

LEVER_NAMES = {"routing": "routing", "cascade": "cascade escalations", "budget_downgrade": "budget downgrades/caps",
               "budget_block": "budget blocks", "run_cap": "run caps", "exact_cache": "exact cache",
               "compression": "compression (net of summaries)", "prefix_cache": "provider prefix cache",
               "batch": "batch lane"}


def _table(title: str, rows: list[dict[str, Any]], cols: list[str]) -> Table:
    t = Table(title=title, title_justify="left")
    for c in cols:
        numeric = (bool(rows) and isinstance(rows[0].get(c), int | float)) or c.endswith("usd")
        t.add_column(c, justify="right" if numeric else "left")
    for r in rows:
        t.add_row(*("" if r.get(c) is None else str(r.get(c)) for c in cols))
    return t


def money(x: str | Decimal | None, places: int = 4) -> str:
    return "" if x is None else f"{Decimal(x):,.{places}f}"


def print_result(console: Console, r: dict[str, Any]) -> None:
    tr, tok = r["trace"], r["tokens"]
    console.print(f"[bold]{r['policy']}[/] on [bold]{tr['name']}[/] ({r['requests']:,} requests over "
                  f"{tr['duration_s'] / 3600:.2f} h from {r['start']}), replayed in {r['elapsed_s']} s",
                  highlight=False)

    def trio(a: Any, b: Any, c: Any) -> str:
        return f"{a:,} / {b:,} / {c:,}"

    head = [{"": "cost (USD)", "value": money(r["cost_usd"])},
            {"": "reference: no levers (USD)", "value": money(r["reference_cost_usd"])},
            {"": "saved", "value": f"{money(r['saved_usd'])} ({r['saved_pct']}%)"},
            {"": "served / cache hits / deferred", "value": trio(r["served"], r["cache_hits"], r["deferred"])},
            {"": "blocked / rate limited / refused", "value": trio(r["blocked"], r["rate_limited"], r["refused"])},
            {"": "stopped by run caps", "value": f"{r.get('run_stopped', 0):,}"},
            {"": "downgraded / capped / batch lane", "value": trio(r["downgraded"], r["truncated"], r["batch_lane"])},
            {"": "tokens in / cached in / out", "value": trio(tok["input"], tok["cached_input"], tok["output"])}]
    console.print(_table("summary", head, ["", "value"]))
    levers = [{"lever": LEVER_NAMES[k], "saved_usd": money(v)} for k, v in r["levers"].items() if k in LEVER_NAMES]
    console.print(_table("what each lever saved", levers, ["lever", "saved_usd"]))
    rows = [dict(m, cost_usd=money(m["cost_usd"])) for m in r["by_model"]]
    console.print(_table("by model", rows, ["model", "requests", "side_calls", "cache_hits", "input_tokens",
                                            "cached_input_tokens", "output_tokens", "batch_lane", "cost_usd"]))
    _levers_detail(console, r)
    if r.get("by"):
        dim = r["by"]["dimension"]
        console.print(_table(f"by {dim}", [dict(x, cost_usd=money(x["cost_usd"])) for x in r["by"]["rows"]],
                             [dim, "requests", "cost_usd"]))
    if r["budgets"]:
        b = [dict(x, first_block=x["first"].get("blocks", ""), first_downgrade=x["first"].get("downgrades", ""))
             for x in r["budgets"]]
        console.print(_table("budgets (would have)", b, ["budget", "limit", "unit", "period", "counters", "max_spent",
                                                        "notifies", "downgrades", "truncations", "defers", "blocks",
                                                        "first_downgrade", "first_block"]))
    console.print(_table("routes", r["routes"], ["reason", "requests"]))
    for note in r["notes"]:
        console.print(f"[dim]note: {note}[/]", highlight=False)


def _levers_detail(console: Console, r: dict[str, Any]) -> None:
    """Compression, cascade escalations and run caps, where the policy has them."""
    c = r.get("compression")
    if c:
        console.print(_table("compression", [dict(c, summary_cost_usd=money(c["summary_cost_usd"]))],
                             ["requests", "tokens_saved", "summaries", "summary_cache_hits", "summaries_refused",
                              "summary_cost_usd"]))
    if r.get("cascade"):
        rows = [dict(g, escalation_cost_usd=money(g["escalation_cost_usd"])) for g in r["cascade"]]
        console.print(_table("cascade escalations", rows, ["group", "verified", "escalated", "by_recorded",
                                                           "by_checks", "by_rate", "rate", "rate_source",
                                                           "escalation_cost_usd"]))
    runs = r.get("runs")
    if runs:
        console.print(f"runs: {runs['runs']:,} in the trace, {runs['stopped_runs']:,} stopped, "
                      f"{runs['stopped_calls']:,} calls refused, {money(runs['avoided_usd'])} USD not spent",
                      highlight=False)
        if runs["by_cap"]:
            rows = [dict(x, avoided_usd=money(x["avoided_usd"])) for x in runs["by_cap"]]
            console.print(_table("run caps (would have stopped)", rows,
                                 ["cap", "limit", "runs", "calls", "avoided_usd", "first"]))


def print_diff(console: Console, d: dict[str, Any]) -> None:
    console.print(f"[bold]{d['policy']}[/] vs baseline [bold]{d['baseline']}[/]: {money(d['policy_cost_usd'])} vs "
                  f"{money(d['baseline_cost_usd'])} USD, difference {money(d['delta_usd'])} ({d['delta_pct']}%)",
                  highlight=False)
    rows = [dict(m, policy_usd=money(m["policy_usd"]), baseline_usd=money(m["baseline_usd"]),
                 delta_usd=money(m["delta_usd"])) for m in d["by_model"]]
    console.print(_table("by model", rows, ["model", "policy_usd", "baseline_usd", "delta_usd"]))
    counts = [{"": k, "policy - baseline": v} for k, v in d["counts"].items()]
    console.print(_table("counts", counts, ["", "policy - baseline"]))


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_").lower()


def plot_replay(results: list[dict[str, Any]], out_dir: Path, stem: str | None = None) -> list[Path]:
    """Cost by model for each result (stacked bars) and the lever waterfall of the first, as
    replay_<trace>_cost.png and replay_<trace>_levers.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    stem = stem or f"replay_{slug(results[0]['trace']['name'])}"
    paths = []
    models = sorted({m["model"] for r in results for m in r["by_model"]})
    fig, ax = plt.subplots(figsize=(7, 4))
    labels = [Path(r["policy"]).stem for r in results]
    bottom = [0.0] * len(results)
    for m in models:
        vals = [float(next((x["cost_usd"] for x in r["by_model"] if x["model"] == m), 0)) for r in results]
        ax.bar(labels, vals, bottom=bottom, label=m)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    ax.set_ylabel("USD")
    ax.set_title(f"{results[0]['trace']['name']}: cost by model")
    ax.legend()
    fig.tight_layout()
    p = out_dir / f"{stem}_cost.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)
    r = results[0]
    steps = [("reference", float(r["reference_cost_usd"]))]
    steps += [(LEVER_NAMES[k], -float(v)) for k, v in r["levers"].items() if k in LEVER_NAMES and v and float(v)]
    fig, ax = plt.subplots(figsize=(7, 4))
    level = 0.0
    for i, (name, v) in enumerate(steps):
        base = level if i else 0.0
        ax.bar(name, v, bottom=base, color="tab:gray" if i == 0 else ("tab:green" if v < 0 else "tab:red"))
        level = base + v
    ax.bar("cost", float(r["cost_usd"]), color="tab:blue")
    ax.set_ylabel("USD")
    ax.set_title(f"{Path(r['policy']).stem}: from reference to cost")
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    fig.tight_layout()
    p = out_dir / f"{stem}_levers.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)
    return paths
