"""`margin budgets list|status|set|delete`: a client of the running gateway's /admin/budgets, so
what it shows is live (spent and reserved) and what it sets takes effect at once."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx
import typer
import yaml

from margin.cli.common import CONFIG_OPT, config_or_exit, console, fail, print_json, print_table

app = typer.Typer(help="Budgets of a running gateway: list, status, set, delete.", no_args_is_help=True)
URL_OPT = typer.Option("http://127.0.0.1:4000", "--url", envvar="MARGIN_URL", help="The gateway")


def _call(config: Path, url: str, method: str, path: str, body: Any = None) -> Any:
    cfg = config_or_exit(config)
    key = os.environ.get("MARGIN_ADMIN_KEY") or cfg.admin_key
    if not key:
        fail("no admin key: set admin_key in the config or MARGIN_ADMIN_KEY")
    try:
        r = httpx.request(method, url.rstrip("/") + path, json=body, timeout=10,
                          headers={"Authorization": f"Bearer {key}"})
    except httpx.HTTPError as e:
        fail(f"cannot reach the gateway at {url}: {e} (start it with `margin serve`, or pass --url)")
        raise
    if r.status_code >= 400:
        try:
            msg = r.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            msg = r.text
        fail(f"HTTP {r.status_code}: {msg}")
    return r.json()


def _rows(budgets: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for b in budgets:
        limit = f"{b['limit_usd']} USD" if b.get("limit_usd") else f"{b['limit_tokens']} tokens"
        scope = ",".join(f"{k}={v}" for k, v in b["scope"].items()) or "(all)"
        actions = " ".join(f"{t['at']}%:{t['action']}" for t in b["thresholds"])
        for c in b["counters"] or [{}]:
            rows.append({"id": b["id"], "scope": c.get("scope", scope), "period": b["period"], "limit": limit,
                         "spent": c.get("spent", "0"), "reserved": c.get("reserved", "0"),
                         "remaining": c.get("remaining", ""), "used_%": c.get("used_pct", 0.0),
                         "exhausted_at": (c.get("forecast_exhausted_at") or "")[:16], "actions": actions,
                         "fired": len(b.get("fired", []))})
    return rows


@app.command("list")
def list_(config: Path = CONFIG_OPT, url: str = URL_OPT, json: bool = typer.Option(False, "--json")) -> None:
    """Every budget with its live counters."""
    data = _call(config, url, "GET", "/admin/budgets")["data"]
    if json:
        print_json(data)
    else:
        print_table(_rows(data), "budgets")


@app.command("status")
def status(budget_id: str, config: Path = CONFIG_OPT, url: str = URL_OPT,
           json: bool = typer.Option(False, "--json")) -> None:
    """One budget: spent, reserved, remaining, forecast exhaustion (linear), actions fired."""
    data = _call(config, url, "GET", f"/admin/budgets/{budget_id}")
    if json:
        print_json(data)
        return
    print_table(_rows([data]), f"budget {budget_id}: {data['period_start'][:16]} -> {data['period_end'][:16]}")
    for f in data.get("fired", []):
        console.print(f"  fired {f['at'][:19]}: threshold {f['threshold_pct']}% at {f['used_pct']}% used")


def _threshold(text: str) -> dict[str, Any]:
    """`80:downgrade:gpt-4o=gpt-4o-mini,*-large=*-small`, `90:defer:low`, `100:block`, `50:notify`."""
    parts = text.split(":", 2)
    if len(parts) < 2:
        fail(f"--threshold {text!r}: use PCT:ACTION[:ARG], e.g. 80:downgrade:gpt-4o=gpt-4o-mini")
    t: dict[str, Any] = {"at": parts[0], "action": parts[1]}
    if len(parts) == 3 and parts[1] == "downgrade":
        t["map"] = dict(pair.split("=", 1) for pair in parts[2].split(",") if "=" in pair)
    elif len(parts) == 3 and parts[1] == "defer":
        t["priority"] = parts[2]
    return t


@app.command("set")
def set_(
    budget_id: str = typer.Option("", "--id", help="Budget id (letters, digits, _.-)"),
    scope: str = typer.Option("", help="e.g. team=research,model=gpt-4o; value * = one counter per value"),
    limit_usd: str = typer.Option("", help="Limit in USD"),
    limit_tokens: int = typer.Option(0, help="Limit in tokens"),
    period: str = typer.Option("month", help="day | week | month | rolling | custom"),
    tz: str = typer.Option("UTC", "--tz", help="Time zone for calendar periods"),
    rolling: str = typer.Option("", help="Window for period rolling, e.g. 24h"),
    threshold: list[str] = typer.Option([], help="PCT:ACTION[:ARG], repeatable (default 100:block)"),
    webhook: str = typer.Option("", help="URL that notify actions POST to"),
    name: str = typer.Option("", help="A label for people"),
    file: Path | None = typer.Option(None, help="A YAML/JSON budget definition instead of the options"),
    config: Path = CONFIG_OPT,
    url: str = URL_OPT,
    json: bool = typer.Option(False, "--json"),
) -> None:
    """Create or replace a budget; it applies from the next request."""
    if file is not None:
        body = yaml.safe_load(file.read_text())
    else:
        body = {"id": budget_id, "name": name, "period": period, "timezone": tz, "webhook": webhook,
                "scope": dict(p.split("=", 1) for p in scope.split(",") if "=" in p)}
        if limit_usd:
            body["limit_usd"] = limit_usd
        if limit_tokens:
            body["limit_tokens"] = limit_tokens
        if rolling:
            body["rolling"] = rolling
        if threshold:
            body["thresholds"] = [_threshold(t) for t in threshold]
    if not body.get("id"):
        fail("a budget needs --id")
    data = _call(config, url, "PUT", f"/admin/budgets/{body['id']}", body)
    if json:
        print_json(data)
    else:
        print_table(_rows([data]), f"budget {data['id']} set")


@app.command("delete")
def delete(budget_id: str, config: Path = CONFIG_OPT, url: str = URL_OPT) -> None:
    """Delete a budget (a budget from margin.yaml stays deleted)."""
    _call(config, url, "DELETE", f"/admin/budgets/{budget_id}")
    console.print(f"budget {budget_id} deleted")
