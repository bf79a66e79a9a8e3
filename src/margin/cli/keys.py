"""`margin keys create|list|revoke`: virtual keys, straight against the ledger store."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import typer

from margin.cli.audit import record_cli
from margin.cli.common import CONFIG_OPT, config_or_exit, console, fail, print_json, print_table
from margin.ledger import open_store
from margin.ledger.keys import key_to_row, new_key, public_view, row_to_key

app = typer.Typer(help="Create, list and revoke virtual keys.", no_args_is_help=True)


def _tags(text: str) -> tuple[tuple[str, str], ...]:
    from margin.gateway.request import parse_tags

    try:
        return parse_tags(text)
    except Exception as e:
        fail(str(e))
        raise


@app.command("create")
def create(
    config: Path = CONFIG_OPT,
    org: str = typer.Option("", help="Organisation"),
    team: str = typer.Option("", help="Team (budgets and reports group by it)"),
    user: str = typer.Option("", help="User"),
    app_: str = typer.Option("", "--app", help="Application"),
    env: str = typer.Option("dev", help="prod | dev | staging | test"),
    models: str = typer.Option("", help="Comma list of models this key may use (default: all)"),
    tags: str = typer.Option("", help="Default tags, e.g. workflow=kyc,feature=x"),
    name: str = typer.Option("", help="A label for people"),
    json: bool = typer.Option(False, "--json", help="Machine-readable output"),
) -> None:
    """Mint a key. The secret is printed once; only its SHA-256 is stored."""
    cfg = config_or_exit(config)
    if env not in ("prod", "dev", "staging", "test"):
        fail("--env must be one of prod, dev, staging, test")
    model_list = tuple(m.strip() for m in models.split(",") if m.strip())
    unknown = [m for m in model_list if cfg.model(m) is None]
    if unknown:
        fail(f"unknown model(s) {', '.join(unknown)}; configured: {', '.join(m.name for m in cfg.models)}")
    secret, key = new_key(org=org, team=team, user=user, app=app_, env=env, name=name, models=model_list,
                          tags=_tags(tags))

    async def run() -> None:
        store = open_store(cfg.ledger.url)
        await store.open()
        try:
            await store.insert_key(key_to_row(key))
        finally:
            await store.close()
        await record_cli(cfg.ledger.url, "key.create", key.key_id, None, public_view(key))

    asyncio.run(run())
    if json:
        print_json({"key": secret, **public_view(key)})
        return
    console.print(f"[bold green]{secret}[/]")
    console.print(f"[dim]key_id {key.key_id} - org={org} team={team} user={user} app={app_} env={env}. "
                  "Store the secret now: margin keeps only its hash.[/]")


def _all_keys(config: Path) -> list[dict[str, Any]]:
    cfg = config_or_exit(config)

    async def run() -> list[dict[str, Any]]:
        store = open_store(cfg.ledger.url)
        await store.open()
        try:
            return [public_view(row_to_key(r)) for r in await store.list_keys()]
        finally:
            await store.close()

    return asyncio.run(run())


@app.command("list")
def list_(config: Path = CONFIG_OPT, json: bool = typer.Option(False, "--json")) -> None:
    """List keys (never their secrets)."""
    keys = _all_keys(config)
    if json:
        print_json(keys)
        return
    rows = [{**k, "models": ",".join(k["models"]) or "*", "tags": ",".join(f"{a}={b}" for a, b in k["tags"].items())}
            for k in keys]
    print_table(rows, "keys", ["key_id", "prefix", "org", "team", "user", "app", "env", "models", "tags", "active"])


@app.command("revoke")
def revoke(key_id: str, config: Path = CONFIG_OPT, json: bool = typer.Option(False, "--json")) -> None:
    """Revoke a key: requests with it get 401 (on every replica within 1 s)."""
    cfg = config_or_exit(config)

    async def run() -> bool:
        store = open_store(cfg.ledger.url)
        await store.open()
        try:
            before = await store.key_by_id(key_id)
            if before is None:
                fail(f"no key with id {key_id}")
                raise AssertionError  # fail() exits
            changed = await store.revoke_key(key_id, datetime.now(UTC))
            after = await store.key_by_id(key_id)
        finally:
            await store.close()
        if changed and after is not None:  # a no-op revoke is not a change
            await record_cli(cfg.ledger.url, "key.revoke", key_id, public_view(row_to_key(before)),
                             public_view(row_to_key(after)))
        return changed

    changed = asyncio.run(run())
    if json:
        print_json({"key_id": key_id, "revoked": True, "changed": changed})
    else:
        console.print(f"{key_id} revoked" if changed else f"{key_id} was already revoked")
