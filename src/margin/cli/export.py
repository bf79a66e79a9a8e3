"""`margin export focus`: the ledger as a FinOps FOCUS 1.2 cost-and-usage file (CSV or Parquet)."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import typer

from margin.cli.common import CONFIG_OPT, config_or_exit, console, fail, print_json
from margin.cli.report import WAREHOUSE_OPT, warehouse_for

app = typer.Typer(help="Export the ledger: FinOps FOCUS 1.2, or a trace to replay.", no_args_is_help=True)


@app.command("focus")
def focus(
    period: str = typer.Option(..., help="Billing period: a month YYYY-MM (or a day YYYY-MM-DD)"),
    out: Path = typer.Option(..., "--out", "-o", help="spend.parquet or spend.csv"),
    team: str = typer.Option("", help="Only this team's charges"),
    config: Path = CONFIG_OPT, warehouse: str = WAREHOUSE_OPT,
    json: bool = typer.Option(False, "--json", help="Print a JSON summary"),
) -> None:
    """One row per (charge day, key attribution, model, token type) in FOCUS 1.2 columns;
    attribution in Tags, requests/runs/outcomes in x_ columns (docs/analytics.md has the mapping)."""
    from margin.analytics.filters import parse_period
    from margin.analytics.focus import focus_rows, write

    if out.suffix.lower() not in (".csv", ".parquet"):
        fail(f"--out {out}: the file must end in .csv or .parquet")
    try:
        start, end = parse_period(period)
    except ValueError as e:
        fail(str(e))
        raise
    cfg = config_or_exit(config)
    wh = warehouse_for(cfg, warehouse)
    rows = focus_rows(wh, start, end, team or None)
    try:
        write(rows, out, wh)
    except OSError as e:
        fail(f"cannot write {out}: {e}")
    finally:
        wh.close()
    total = sum((r["BilledCost"] for r in rows), Decimal(0))
    summary = {"out": str(out), "period_start": start.isoformat(), "period_end": end.isoformat(), "rows": len(rows),
               "billed_cost_usd": format(total, "f"), "focus_version": "1.2"}
    if json:
        print_json(summary)
    else:
        console.print(f"wrote {len(rows)} FOCUS 1.2 rows to {out} ({period}, ${total} billed)", highlight=False)
