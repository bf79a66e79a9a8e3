"""`margin forecast backtest|show|anomalies`: daily-spend forecasts per budget and workflow, their
backtest error, budgets' predicted exhaustion, and anomalies that fire the budget's webhook."""

from __future__ import annotations

import asyncio
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import typer

from margin.cli.common import CONFIG_OPT, config_or_exit, console, fail, print_json, print_table
from margin.cli.report import WAREHOUSE_OPT, warehouse_for
from margin.config import BudgetConfig, Config

app = typer.Typer(help="Spend forecasts, backtests, budget exhaustion and anomalies.", no_args_is_help=True)
JSON_OPT = typer.Option(False, "--json", help="JSON for machines")
HISTORY_OPT = typer.Option(90, help="Days of history to use")


def budgets_of(cfg: Config) -> list[Any]:
    """Budgets of margin.yaml overlaid by those set live (stored in the ledger), as the gateway
    sees them."""
    from margin.ledger import StoreUnavailable, open_store
    from margin.wiring import to_budget

    async def stored() -> list[dict[str, Any]]:
        st = open_store(cfg.ledger.url)
        await st.open()
        try:
            return await st.list_budgets()
        finally:
            await st.close()

    try:
        rows = asyncio.run(stored())
    except StoreUnavailable as e:
        fail(f"cannot read the ledger {cfg.ledger.url}: {e}")
        raise
    defs = {b.id: b for b in cfg.budgets}
    for r in rows:
        if r["body"] is None:
            defs.pop(r["id"], None)
        else:
            b = BudgetConfig.model_validate_json(r["body"])
            defs[b.id] = b
    return [to_budget(b) for b in defs.values()]


def _workflows(cfg: Config, wh: Any) -> list[str]:
    seen = [r["w"] for r in wh.query("SELECT DISTINCT workflow AS w FROM events WHERE run_id IS NOT NULL "
                                     "AND workflow IS NOT NULL ORDER BY 1")]
    return list(dict.fromkeys([w.name for w in cfg.workflows] + seen))


def _series(wh: Any, cfg: Config, history: int, today: date) -> list[tuple[str, str, Any]]:
    """(kind, id, daily history up to yesterday) for every budget and workflow."""
    from margin.analytics.anomaly import budget_filter, daily_totals
    from margin.analytics.filters import Filter

    first, last = today - timedelta(days=history), today - timedelta(days=1)
    out = [("budget", b.id, daily_totals(wh, budget_filter(b), first, last, "usd" if b.unit == "usd" else "tokens"))
           for b in budgets_of(cfg)]
    for wf in _workflows(cfg, wh):
        out.append(("workflow", wf, daily_totals(wh, Filter(where=(("workflow", wf),)), first, last)))
    # From the first day with spend: days before the scope existed are not zero-spend days.
    return [(k, i, y[int((y > 0).argmax()):] if (y > 0).any() else y[:0]) for k, i, y in out]


@app.command("backtest")
def backtest(
    config: Path = CONFIG_OPT, warehouse: str = WAREHOUSE_OPT, history: int = HISTORY_OPT,
    horizon: int = typer.Option(7, help="Days forecast per fold"), folds: int = typer.Option(4, help="Folds"),
    synthetic_only: bool = typer.Option(False, help="Only the 90-day synthetic reference history"),
    json: bool = JSON_OPT,
) -> None:
    """Rolling-origin backtest: MAPE of the forecast against the seasonal naive one, and how often
    the 95% interval held the actual day. Always includes a 90-day synthetic history with weekly
    seasonality and trend as a reference; then every budget and workflow with enough history."""
    from margin.analytics import forecast as fc
    from margin.analytics.synthetic import daily_spend

    rows = [{"kind": "synthetic", "id": "90 days, weekly seasonality, +0.8 $/day trend, 8% noise",
             **fc.backtest(daily_spend(90, seed=0), horizon, folds)}]
    if not synthetic_only:
        cfg = config_or_exit(config)
        wh = warehouse_for(cfg, warehouse)
        for kind, ident, y in _series(wh, cfg, history, datetime.now(UTC).date()):
            if len(y) < fc.MIN_ETS_DAYS + horizon:
                rows.append({"kind": kind, "id": ident, "days": len(y), "model": "too little history"})
                continue
            rows.append({"kind": kind, "id": ident, **fc.backtest(y, horizon, folds)})
        wh.close()
    if json:
        print_json({"horizon_days": horizon, "folds": folds, "rows": rows})
    else:
        print_table(rows, "forecast backtest (MAPE %, lower is better)",
                    ["kind", "id", "days", "model", "mape_pct", "seasonal_naive_mape_pct", "interval_coverage"])


@app.command("show")
def show(
    config: Path = CONFIG_OPT, warehouse: str = WAREHOUSE_OPT, history: int = HISTORY_OPT,
    days: int = typer.Option(14, help="Days ahead"), png: Path | None = typer.Option(None, "--png"),
    json: bool = JSON_OPT,
) -> None:
    """Daily-spend forecast with a 95% interval per budget and workflow, and each budget's
    predicted exhaustion date (expected, earliest, latest) in its current period."""
    from margin.analytics import forecast as fc
    from margin.analytics.anomaly import budget_filter
    from margin.analytics.queries import period_spend
    from margin.policy.budget import window

    cfg = config_or_exit(config)
    wh = warehouse_for(cfg, warehouse)
    now = datetime.now(UTC)
    today = now.date()
    budgets = {b.id: b for b in budgets_of(cfg)}
    out = []
    for kind, ident, y in _series(wh, cfg, history, today):
        f = fc.forecast(y, today, days)
        row: dict[str, Any] = {"kind": kind, "id": ident, "model": f.model, "next_7d_usd": round(float(
            f.mean[:7].sum()), 4), "forecast": f.rows()}
        b = budgets.get(ident) if kind == "budget" else None
        if b is not None and b.unit == "usd":
            start, end = window(b, now)
            spent = period_spend(wh, budget_filter(b), start, now)
            today_spent = period_spend(wh, budget_filter(b), datetime.combine(today, datetime.min.time(), UTC), now)
            row.update(limit_usd=str(b.limit), spent_usd=str(spent), period_end=end.isoformat(),
                       **fc.exhaustion(y, spent, b.limit, now, end, today_spent))
        out.append(row)
        if png is not None:
            from margin.analytics import charts

            hist_days = [(today - timedelta(days=len(y) - i)).isoformat() for i in range(len(y))]  # ends yesterday
            charts.forecast(hist_days[-42:], list(y[-42:]), [d.isoformat() for d in f.days], list(f.mean),
                            list(f.lower), list(f.upper), f"{kind} {ident}: daily spend forecast",
                            png / f"forecast_{kind}_{ident}.png")
    wh.close()
    if json:
        print_json({"at": now.isoformat(), "rows": out})
        return
    print_table([{k: v for k, v in r.items() if k != "forecast"} for r in out], f"forecast, next {days} days",
                ["kind", "id", "model", "next_7d_usd", "limit_usd", "spent_usd", "exhausted_on", "earliest", "latest"])


@app.command("anomalies")
def anomalies(
    config: Path = CONFIG_OPT, warehouse: str = WAREHOUSE_OPT,
    notify: bool = typer.Option(False, "--notify", help="Fire each budget's webhook (once per budget and day)"),
    at: str = typer.Option("", help="Judge as of this ISO time (default: now)"),
    history: int = typer.Option(56, help="Days of history behind the forecast"),
    json: bool = JSON_OPT,
) -> None:
    """Days whose spend (per budget) or calls per run (per workflow) fell far outside the 99%
    forecast interval: yesterday either way, today only once it is already above the day's bound."""
    from margin.analytics.anomaly import check
    from margin.ledger import StoreUnavailable, open_store

    cfg = config_or_exit(config)
    try:
        now = datetime.fromisoformat(at) if at else datetime.now(UTC)
    except ValueError:
        fail(f"--at {at!r}: use an ISO time like 2026-11-20T12:00:00+00:00")
        raise
    now = now if now.tzinfo else now.replace(tzinfo=UTC)
    budgets = budgets_of(cfg)
    wh = warehouse_for(cfg, warehouse)
    workflows = _workflows(cfg, wh)

    async def run() -> list[dict[str, Any]]:
        st = open_store(cfg.ledger.url)
        await st.open()
        try:
            return await check(wh, st, budgets, now, workflows, notify=notify, history_days=history)
        finally:
            await st.close()

    try:
        rows = asyncio.run(run())
    except StoreUnavailable as e:
        fail(f"cannot read the ledger {cfg.ledger.url}: {e}")
        raise
    finally:
        wh.close()
    if json:
        print_json({"at": now.isoformat(), "anomalies": rows})
    elif rows:
        print_table(rows, f"anomalies as of {now:%Y-%m-%d %H:%M} UTC",
                    ["subject", "id", "metric", "day", "actual", "expected", "lower", "upper", "direction",
                     "budget", "notified"])
    else:
        console.print(f"no anomalies as of {now:%Y-%m-%d %H:%M} UTC ({len(budgets)} budgets, "
                      f"{len(workflows)} workflows)", highlight=False)
