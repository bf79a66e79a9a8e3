"""`margin`: the command line. One module per noun; this one wires them together."""

from __future__ import annotations

import logging
from pathlib import Path

import typer

from margin import __version__
from margin.cli import audit as audit_cli
from margin.cli import budgets, cache, export, forecast, keys, report, router
from margin.cli import distill as distill_cli
from margin.cli import plan as plan_cli
from margin.cli import replay as replay_cli
from margin.cli.common import CONFIG_OPT, config_or_exit, console, fail, print_table

app = typer.Typer(help="margin: meter, price and control every LLM call.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
app.add_typer(keys.app, name="keys")
app.add_typer(budgets.app, name="budgets")
app.add_typer(router.app, name="router")
app.add_typer(cache.app, name="cache")
app.add_typer(report.app, name="report")
app.add_typer(forecast.app, name="forecast")
app.add_typer(export.app, name="export")
app.add_typer(plan_cli.app, name="plan")
app.add_typer(audit_cli.app, name="audit")
app.add_typer(distill_cli.app, name="distill")
app.command("replay")(replay_cli.replay_command)
export.app.command("trace", help="The ledger as a replayable trace (margin trace JSONL).")(replay_cli.export_trace)
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
    forwarded_allow_ips: str = typer.Option(
        "127.0.0.1", envvar="FORWARDED_ALLOW_IPS",
        help="Comma-separated addresses/CIDRs of reverse proxies trusted to set X-Forwarded-For/-Proto "
             "(the client address the sign-in throttle and logs see); '*' trusts every peer"),
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
                access_log=False, log_level=log_level, timeout_graceful_shutdown=30,
                proxy_headers=True, forwarded_allow_ips=forwarded_allow_ips)


def _register_mock() -> None:
    try:
        from margin.cli.mock import mock_upstream_command
    except ImportError:  # written in parallel; the CLI must still load without it
        return
    app.command("mock-upstream", help="Run the simulated OpenAI-compatible provider.")(mock_upstream_command)


_register_mock()


if __name__ == "__main__":
    app()
