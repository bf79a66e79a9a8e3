"""`margin`: the command line. One module per noun; this one wires them together."""

from __future__ import annotations

import asyncio
import logging
from decimal import Decimal
from pathlib import Path

import typer

from margin import __version__
from margin.cli import budgets, cache, keys, router
from margin.cli import plan as plan_cli
from margin.cli.common import CONFIG_OPT, config_or_exit, console, fail, print_json, print_table
from margin.domain import usd

app = typer.Typer(help="margin: meter, price and control every LLM call.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
app.add_typer(keys.app, name="keys")
app.add_typer(budgets.app, name="budgets")
app.add_typer(router.app, name="router")
app.add_typer(cache.app, name="cache")
app.add_typer(plan_cli.app, name="plan")
config_app = typer.Typer(help="Validate configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")


@app.command()
def version() -> None:
    """Print margin's version."""
    console.print(__version__)


@config_app.command("check")
def config_check(path: Path = typer.Argument(Path("margin.yaml"))) -> None:
    """Validate margin.yaml, resolve every model's price, and say what it found."""
    cfg = config_or_exit(path)
    from margin.pricing import PricingError, model_rates

    rows = []
    for m in cfg.models:
        try:
            r = model_rates(m)
        except PricingError as e:
            fail(str(e))
            raise
        rows.append({"model": m.name, "provider": m.provider, "upstream": m.upstream_id,
                     "input_$/MTok": str(r.input.base), "output_$/MTok": str(r.output.base),
                     "cache_read_$/MTok": str(r.cache_read.base), "source": r.source})
    print_table(rows, f"{path}: valid")


@app.command()
def serve(
    config: Path = CONFIG_OPT,
    host: str = typer.Option("127.0.0.1", help="Interface to listen on"),
    port: int = typer.Option(4000, help="Port"),
    log_level: str = typer.Option("warning", help="uvicorn log level"),
) -> None:
    """Run the gateway (OpenAI-compatible) on uvicorn with uvloop and httptools."""
    import uvicorn

    from margin.gateway.app import MarginApp

    cfg = config_or_exit(config)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        application = MarginApp(cfg)
    except Exception as e:
        fail(f"cannot start: {e}")
        raise
    console.print(f"margin {__version__} serving on http://{host}:{port}/v1 "
                  f"(ledger {cfg.ledger.url}, {len(cfg.models)} models)", highlight=False)
    uvicorn.run(application, host=host, port=port, loop="uvloop", http="httptools", lifespan="on",
                access_log=False, log_level=log_level, timeout_graceful_shutdown=30)


@app.command()
def report(
    config: Path = CONFIG_OPT,
    since: str = typer.Option("7d", help="30m, 24h, 7d, 2w or an ISO date"),
    by: str = typer.Option("team,model", help="Comma list: team, model, provider, user, app, env, day, tag:<k> ..."),
    format: str = typer.Option("table", "--format", "-f", help="table | json | csv"),
    json: bool = typer.Option(False, "--json", help="Same as --format json"),
) -> None:
    """Spend, tokens, requests, p50/p95 latency and error rate from the ledger."""
    from margin.analytics.report import check_by, parse_since, spend
    from margin.ledger import open_store

    cfg = config_or_exit(config)
    fmt = "json" if json else format
    if fmt not in ("table", "json", "csv"):
        fail("--format must be table, json or csv")
    try:
        start = parse_since(since)
        cols = check_by([b.strip() for b in by.split(",") if b.strip()])
    except ValueError as e:
        fail(str(e))
        raise

    async def fetch() -> list[dict[str, object]]:
        store = open_store(cfg.ledger.url)
        await store.open()
        try:
            return await store.fetch_events(since=start)
        finally:
            await store.close()

    rows = spend(asyncio.run(fetch()), cols)
    if fmt == "json":
        print_json({"since": start.isoformat(), "by": cols, "rows": rows})
    elif fmt == "csv":
        import csv
        import sys

        if rows:
            w = csv.DictWriter(sys.stdout, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    else:
        total = sum((Decimal(r["cost_usd"]) for r in rows), Decimal(0))
        print_table(rows, f"spend since {start:%Y-%m-%d %H:%M} UTC by {', '.join(cols)} - total ${usd(total)}",
                    [*cols, "requests", "error_rate", "input_tokens", "cached_input_tokens", "output_tokens",
                     "cost_usd", "p50_ms", "p95_ms"])


def _register_mock() -> None:
    try:
        from margin.cli.mock import mock_upstream_command
    except ImportError:  # written in parallel; the CLI must still load without it
        return
    app.command("mock-upstream", help="Run the simulated OpenAI-compatible provider.")(mock_upstream_command)


_register_mock()


if __name__ == "__main__":
    app()
