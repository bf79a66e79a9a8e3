"""Shared CLI plumbing: load the config or exit with its message, print JSON or a rich table."""

from __future__ import annotations

import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import typer
from rich.console import Console
from rich.table import Table

from margin.config import Config, ConfigError, load_config

# Off a terminal rich assumes 80 columns and squeezes tables; reports are wide.
console = Console(width=None if sys.stdout.isatty() else 200)
err_console = Console(stderr=True, soft_wrap=True)
CONFIG_OPT = typer.Option(Path("margin.yaml"), "--config", "-c", help="margin.yaml", envvar="MARGIN_CONFIG")


def fail(message: str, code: int = 2) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def config_or_exit(path: Path) -> Config:
    try:
        return load_config(path)
    except ConfigError as e:
        fail(str(e))
        raise AssertionError from e  # unreachable: fail() exits


def since_or_exit(text: str) -> datetime:
    """--since (30m, 24h, 7d, 2w or an ISO date) as a time, or exit with the parser's message."""
    from margin.analytics.filters import parse_since

    try:
        return parse_since(text)
    except ValueError as e:
        fail(str(e))
        raise AssertionError from e  # unreachable: fail() exits


def print_json(obj: Any) -> None:
    sys.stdout.write(orjson.dumps(obj, option=orjson.OPT_INDENT_2).decode() + "\n")


def print_table(rows: list[dict[str, Any]], title: str = "", columns: list[str] | None = None) -> None:
    if not rows:
        console.print(f"[dim]{title}: no rows[/]" if title else "[dim]no rows[/]")
        return
    cols = columns or list(rows[0])
    t = Table(title=title or None, show_lines=False)
    for c in cols:
        numeric = isinstance(rows[0].get(c), int | float) or c.endswith(("_usd", "_ms"))
        t.add_column(c, justify="right" if numeric else "left")
    for r in rows:
        t.add_row(*("" if r.get(c) is None else str(r.get(c)) for c in cols))
    console.print(t)
