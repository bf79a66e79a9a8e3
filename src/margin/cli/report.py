"""`margin report [spend|outcomes|runs]`: reports in DuckDB over the ledger (the analytics warehouse).

`margin report --by team,model` (no subcommand) is the spend report, as before."""

from __future__ import annotations

import csv
import sys
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import typer

from margin.cli.common import CONFIG_OPT, config_or_exit, console, err_console, fail, print_json, print_table
from margin.config import Config

app = typer.Typer(help="Reports from the ledger: spend (default), outcomes, runs.", invoke_without_command=True)

SINCE_OPT = typer.Option("7d", help="30m, 24h, 7d, 2w or an ISO date")
UNTIL_OPT = typer.Option("", help="ISO date/time (default: now)")
PERIOD_OPT = typer.Option("", help="A month YYYY-MM or a day YYYY-MM-DD (overrides --since/--until)")
TEAM_OPT = typer.Option("", help="Only this team's rows (what a team viewer sees)")
FORMAT_OPT = typer.Option("table", "--format", "-f", help="table | json | csv")
JSON_OPT = typer.Option(False, "--json", help="Same as --format json")
PNG_OPT = typer.Option(None, "--png", help="Also write PNG charts into this directory")
WAREHOUSE_OPT = typer.Option(".margin/analytics.duckdb", "--warehouse", envvar="MARGIN_WAREHOUSE",
                             help="DuckDB file kept between runs (only new ledger rows are read); :memory: for none")


def warehouse_for(cfg: Config, path: str) -> Any:
    """The warehouse, refreshed from the ledger. A file another process holds open falls back to
    an in-memory copy (slower: it reads the whole ledger)."""
    import duckdb

    from margin.analytics.warehouse import Warehouse
    from margin.ledger import StoreUnavailable

    try:
        wh = Warehouse(cfg.ledger.url, None if path in ("", ":memory:") else path)
    except duckdb.IOException as e:
        err_console.print(f"[yellow]warning:[/] {path} is in use ({e}); using an in-memory copy")
        wh = Warehouse(cfg.ledger.url)
    try:
        wh.refresh_blocking()
    except StoreUnavailable as e:
        fail(f"cannot read the ledger {cfg.ledger.url}: {e}")
    return wh


def window(since: str, until: str, period: str, team: str, where: tuple[tuple[str, str], ...] = ()) -> Any:
    from margin.analytics.filters import Filter, parse_period, parse_since

    try:
        if period:
            start, end = parse_period(period)
        else:
            start = parse_since(since)
            end = parse_since(until) if until else datetime.now(UTC)
        return Filter(since=start, until=end, team=team or None, where=where)
    except ValueError as e:
        fail(str(e))
        raise


def _fmt(format: str, json: bool) -> str:
    fmt = "json" if json else format
    if fmt not in ("table", "json", "csv"):
        fail("--format must be table, json or csv")
    return fmt


def _csv(rows: list[dict[str, Any]]) -> None:
    if rows:
        w = csv.DictWriter(sys.stdout, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _span(f: Any) -> str:
    team = f" team {f.team}" if f.team else ""
    return f"{f.since:%Y-%m-%d %H:%M} -> {f.until:%Y-%m-%d %H:%M} UTC{team}"


def _parse_by(by: str) -> list[str]:
    from margin.analytics.filters import check_dimension

    try:
        return [check_dimension(b.strip()) for b in by.split(",") if b.strip()]
    except ValueError as e:
        fail(f"--by: {e}")
        raise


def _spend(config: Path, since: str, until: str, period: str, team: str, by: str, top: int, format: str,
           json: bool, png: Path | None, warehouse: str) -> None:
    from margin.analytics import queries as q

    cfg = config_or_exit(config)
    fmt, cols, f = _fmt(format, json), _parse_by(by), window(since, until, period, team)
    wh = warehouse_for(cfg, warehouse)
    rows = q.spend_by(wh, f, cols)
    levers = q.levers(wh, f)
    tops = {d: q.top_spenders(wh, f, d, top) for d in ("user", "team", "model")} if top else {}
    if fmt == "json":
        print_json({"since": f.since.isoformat(), "until": f.until.isoformat(), "team": f.team, "by": cols,
                    "rows": rows, "levers": levers, "top_spenders": tops})
    elif fmt == "csv":
        _csv(rows)
    else:
        total = sum((Decimal(r["cost_usd"]) for r in rows), Decimal(0))
        print_table(rows, f"spend {_span(f)} by {', '.join(cols)} - total ${total}",
                    [*cols, "requests", "error_rate", "input_tokens", "cached_input_tokens", "output_tokens",
                     "cost_usd", "p50_ms", "p95_ms"])
        print_table(levers, "saved by lever")
        for d, t in tops.items():
            print_table(t, f"top {top} {d}s by spend")
    if png is not None:
        from margin.analytics import charts

        first = cols[0] if cols and cols[0] not in ("hour", "day", "week", "month") else "team"
        bucket = "hour" if (f.until - f.since).total_seconds() <= 2 * 86400 else "day"
        paths = [charts.spend_stacked(q.spend_series(wh, f, first, bucket), f"spend by {first} per {bucket}",
                                      png / f"spend_by_{first.replace(':', '_')}.png")]
        if levers:
            paths.append(charts.bars(levers, "lever", "saved_usd", "money saved per lever", png / "levers.png"))
        paths.append(charts.bars(q.top_spenders(wh, f, "user", 15), "key", "cost_usd", "top users by spend",
                                 png / "top_users.png"))
        _said(paths, fmt)
    wh.close()


def _said(paths: list[Path], fmt: str) -> None:
    out = err_console if fmt != "table" else console
    for p in paths:
        out.print(f"wrote {p}", highlight=False)


@app.callback()
def report(
    ctx: typer.Context,
    config: Path = CONFIG_OPT, since: str = SINCE_OPT, until: str = UNTIL_OPT, period: str = PERIOD_OPT,
    team: str = TEAM_OPT,
    by: str = typer.Option("team,model", help="Comma list: team, model, provider, user, app, env, workflow, "
                           "hour, day, week, month, tag:<k> ..."),
    top: int = typer.Option(0, help="Also list the top N users, teams and models by spend"),
    format: str = FORMAT_OPT, json: bool = JSON_OPT, png: Path | None = PNG_OPT, warehouse: str = WAREHOUSE_OPT,
) -> None:
    """Spend, tokens, requests, p50/p95 latency and error rate from the ledger (spend report)."""
    if ctx.invoked_subcommand is None:
        _spend(config, since, until, period, team, by, top, format, json, png, warehouse)


@app.command("spend")
def spend(
    config: Path = CONFIG_OPT, since: str = SINCE_OPT, until: str = UNTIL_OPT, period: str = PERIOD_OPT,
    team: str = TEAM_OPT,
    by: str = typer.Option("team,model", help="Comma list of dimensions (team, model, day, tag:<k> ...)"),
    top: int = typer.Option(10, help="Top N users, teams and models by spend (0: none)"),
    format: str = FORMAT_OPT, json: bool = JSON_OPT, png: Path | None = PNG_OPT, warehouse: str = WAREHOUSE_OPT,
) -> None:
    """Spend by any attribution dimension and period, top spenders, money saved per lever."""
    _spend(config, since, until, period, team, by, top, format, json, png, warehouse)


@app.command("outcomes")
def outcomes(
    config: Path = CONFIG_OPT, since: str = typer.Option("30d", help="30m, 24h, 7d, 2w or an ISO date"),
    until: str = UNTIL_OPT, period: str = PERIOD_OPT, team: str = TEAM_OPT,
    bucket: str = typer.Option("day", help="Trend bucket: day | week | month"),
    format: str = FORMAT_OPT, json: bool = JSON_OPT, png: Path | None = PNG_OPT, warehouse: str = WAREHOUSE_OPT,
) -> None:
    """Cost per successful outcome per workflow (all spend of its runs / successes), the agentic
    multiplier, p50/p95 run cost, baseline, saving and ROI, and the trend."""
    from margin.analytics import runs as r
    from margin.analytics.outcomes import baselines

    cfg = config_or_exit(config)
    fmt, f = _fmt(format, json), window(since, until, period, team)
    wh = warehouse_for(cfg, warehouse)
    fixed, periods = baselines(cfg.workflows)
    try:
        rows = r.cost_per_outcome(wh, f, fixed, periods)
        trend = r.outcome_trend(wh, f, bucket)
    except ValueError as e:
        fail(str(e))
        raise
    names = {w.name: w.outcome for w in cfg.workflows}
    for row in rows:
        row["outcome"] = names.get(row["workflow"], "success")
    if fmt == "json":
        print_json({"since": f.since.isoformat(), "until": f.until.isoformat(), "team": f.team,
                    "workflows": rows, "trend": trend})
    elif fmt == "csv":
        _csv(rows)
    else:
        print_table(rows, f"cost per successful outcome {_span(f)}",
                    ["workflow", "runs", "successes", "success_rate", "spend_usd", "cost_per_outcome_usd",
                     "calls_per_outcome", "tokens_per_outcome", "p50_run_cost_usd", "p95_run_cost_usd",
                     "baseline_cost_per_outcome_usd", "saving_usd", "roi"])
        print_table(trend, f"trend per {bucket}")
    if png is not None:
        from margin.analytics import charts

        base = {x["workflow"]: float(x["baseline_cost_per_outcome_usd"]) for x in rows
                if x["baseline_cost_per_outcome_usd"] is not None}
        _said([charts.outcome_trend(trend, base, f"cost per successful outcome per {bucket}",
                                    png / "cost_per_outcome.png"),
               charts.bars(rows, "workflow", "calls_per_outcome", "LLM calls per successful outcome",
                           png / "agentic_multiplier.png", xlabel="calls")], fmt)
    wh.close()


@app.command("runs")
def runs(
    config: Path = CONFIG_OPT, since: str = SINCE_OPT, until: str = UNTIL_OPT, period: str = PERIOD_OPT,
    team: str = TEAM_OPT, workflow: str = typer.Option("", help="Only this workflow"),
    run: str = typer.Option("", "--run", help="Show one run's calls, in order"),
    order: str = typer.Option("cost", help="cost | recent | calls"),
    limit: int = typer.Option(20, help="How many runs"),
    format: str = FORMAT_OPT, json: bool = JSON_OPT, png: Path | None = PNG_OPT, warehouse: str = WAREHOUSE_OPT,
) -> None:
    """Agent runs: cost, LLM and tool calls, tokens, errors, caps hit, duration, outcome."""
    from margin.analytics import runs as r

    cfg = config_or_exit(config)
    fmt, f = _fmt(format, json), window(since, until, period, team)
    wh = warehouse_for(cfg, warehouse)
    try:
        rows = r.run_steps(wh, run, f) if run else r.runs(wh, f, workflow or None, limit, order)
    except ValueError as e:
        fail(str(e))
        raise
    if fmt == "json":
        print_json({"run": run, "rows": rows} if run else {"since": f.since.isoformat(), "rows": rows})
    elif fmt == "csv":
        _csv(rows)
    elif run:
        print_table(rows, f"run {run}", ["ts_start", "step", "agent", "tool", "model", "status", "input_tokens",
                                         "output_tokens", "cost_usd", "latency_ms", "cache_hit"])
    else:
        print_table(rows, f"runs {_span(f)} by {order}",
                    ["run_id", "workflow", "team", "calls", "tool_calls", "tokens", "errors", "caps_hit",
                     "duration_s", "cost_usd", "outcome"])
    if png is not None and not run:
        from margin.analytics import charts

        every = r.runs(wh, f, workflow or None, 1_000_000, "cost")
        _said([charts.histogram([float(x["cost_usd"]) for x in every], "cost per run", "USD",
                                png / "run_cost.png")], fmt)
    wh.close()
