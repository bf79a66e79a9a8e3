"""`margin audit [list] | export | verify`: the audit log of changes to keys, budgets and config,
read straight from the ledger database (no running gateway needed).

    margin audit [--since 7d] [--target key_x] [--action key.*] [--json | --csv]
    margin audit export --out audit.jsonl [--format jsonl|csv]
    margin audit verify [--anchor SEQ:HASH] [--file audit.jsonl] [--json]      exit 1 if the chain is broken
"""

from __future__ import annotations

import asyncio
import csv
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import orjson
import typer
from typer.core import TyperGroup

from margin.cli.common import CONFIG_OPT, config_or_exit, console, err_console, fail, print_json, print_table
from margin.ledger.audit import FIELDS, AuditLog, Checker, Query, Verdict, decoded, ts_text

T = TypeVar("T")


class _DefaultToList(TyperGroup):
    """`margin audit` and `margin audit --since 7d` mean `margin audit list ...`."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:  # Any: typer vendors its own click
        if not args or (args[0].startswith("-") and args[0] not in ("--help", "-h")):
            args = ["list", *args]
        return super().parse_args(ctx, args)


app = typer.Typer(cls=_DefaultToList, help="The audit log: who changed keys, budgets and config, when, from where; "
                                           "hash-chained (`margin audit verify`).")


def _with_log(config: Path, fn: Callable[[AuditLog], Coroutine[Any, Any, T]]) -> T:
    cfg = config_or_exit(config)

    async def run() -> T:
        log = AuditLog(cfg.ledger.url, pool_size=1)
        await log.open()
        try:
            return await fn(log)
        finally:
            await log.close()

    try:
        return asyncio.run(run())
    except typer.Exit:
        raise
    except Exception as e:
        fail(f"cannot read the audit log at {cfg.ledger.url}: {type(e).__name__}: {e}", 1)
        raise


def _short(v: Any) -> str:
    text = v if isinstance(v, str) else orjson.dumps(v).decode()
    return text if len(text) <= 40 else text[:37] + "..."


def summary(rec: dict[str, Any], most: int = 3) -> str:
    """What changed, for people: `field: old -> new` for the first few fields."""
    from margin.gateway.audit import diff

    before, after = rec.get("before"), rec.get("after")
    if rec.get("action") == "config.unchanged":
        return f"same as #{(after or {}).get('same_as_seq')}"
    if rec.get("action", "").startswith("config.") and isinstance(after, dict):
        if "changed" not in after:
            return f"first recorded config {str(after.get('hash', ''))[:12]}"
        before, after = (before or {}).get("changed", {}), after.get("changed", {})
        paths = sorted(set(before) | set(after))
        changes = [f"{p}: {_short(before.get(p, '-'))} -> {_short(after.get(p, '-'))}" for p in paths]
    elif before is None:
        return "created"
    elif after is None:
        return "deleted"
    else:
        b, a = diff(before if isinstance(before, dict) else {"value": before},
                    after if isinstance(after, dict) else {"value": after})
        changes = [f"{p}: {_short(b.get(p, '-'))} -> {_short(a.get(p, '-'))}" for p in sorted(set(b) | set(a))]
    extra = f" (+{len(changes) - most} more)" if len(changes) > most else ""
    return "; ".join(changes[:most]) + extra


async def record_cli(ledger_url: str, action: str, target: str, before: Any, after: Any) -> None:
    """Audit a change a CLI command made straight in the store (e.g. `margin keys create|revoke`), as
    `user@host (margin CLI)`. Public views only, sanitized like the gateway's records."""
    import socket

    from margin.gateway.audit import Who, sanitize, user

    log = AuditLog(ledger_url, pool_size=1)
    await log.open()
    try:
        before, after = sanitize(before), sanitize(after)
        if before != after:
            w = Who(f"{user()}@{socket.gethostname()} (margin CLI)", socket.gethostname())
            await log.append(w.actor, action, target, before, after, w.address)
    finally:
        await log.close()


@app.command("list")
def list_(
    config: Path = CONFIG_OPT,
    since: str | None = typer.Option(None, help="30m, 24h, 7d, 2w or an ISO date"),
    target: str | None = typer.Option(None, help="a key id, a budget id, or 'config'"),
    action: str | None = typer.Option(None, help="e.g. key.revoke, or a prefix: key.* / budget.* / config.*"),
    actor: str | None = typer.Option(None, help="e.g. admin, 'admin (dashboard)'"),
    limit: int = typer.Option(100, min=1, max=100_000, help="newest N records"),
    json: bool = typer.Option(False, "--json", help="machine-readable records (before/after as JSON)"),
    csv_out: bool = typer.Option(False, "--csv", help="CSV on stdout"),
) -> None:
    """The newest audit records (optionally filtered), newest first."""
    from margin.analytics.filters import parse_since

    if json and csv_out:
        fail("choose one of --json and --csv")
    try:
        start = ts_text(parse_since(since)) if since else None
    except ValueError as e:
        fail(str(e))
        raise
    q = Query(since=start, target=target, action=action, actor=actor, limit=limit)
    rows = [decoded(r) for r in _with_log(config, lambda log: log.query(q))]
    if json:
        print_json(rows)
    elif csv_out:
        _write_csv(rows, sys.stdout)
    else:
        print_table([{"seq": r["seq"], "time (UTC)": r["ts"][:19].replace("T", " "), "actor": r["actor"],
                      "action": r["action"], "target": r["target"], "address": r["address"] or "-",
                      "change": summary(r)} for r in rows], "audit log (newest first)")


def _write_csv(rows: list[dict[str, Any]], out: Any) -> None:
    w = csv.writer(out)
    w.writerow(FIELDS)
    for r in rows:
        w.writerow(["" if r.get(f) is None else r[f] if isinstance(r[f], str | int)
                    else orjson.dumps(r[f], option=orjson.OPT_SORT_KEYS).decode() for f in FIELDS])


@app.command("export")
def export(
    out: Path = typer.Option(..., "--out", "-o", help="file to write"),
    fmt: str = typer.Option("jsonl", "--format", help="jsonl (verifiable: `margin audit verify --file`) | csv"),
    config: Path = CONFIG_OPT,
    json: bool = typer.Option(False, "--json", help="machine-readable summary"),
) -> None:
    """Every record, oldest first, as stored (before/after are the canonical JSON text that was hashed)."""
    if fmt not in ("jsonl", "csv"):
        fail(f"--format {fmt!r}: choose jsonl or csv")

    async def dump(log: AuditLog) -> tuple[int, int, str]:
        n, seq, h = 0, 0, ""
        with out.open("w", encoding="utf-8", newline="") as f:
            w = csv.writer(f) if fmt == "csv" else None
            if w is not None:
                w.writerow(FIELDS)
            async for r in log.scan():
                if w is not None:
                    w.writerow(["" if r.get(k) is None else r[k] for k in FIELDS])
                else:
                    f.write(orjson.dumps({k: r.get(k) for k in FIELDS}).decode() + "\n")
                n, seq, h = n + 1, int(r["seq"]), str(r["hash"])
        return n, seq, h

    try:
        n, seq, h = _with_log(config, dump)
    except OSError as e:
        fail(f"cannot write {out}: {e}", 1)
        raise
    result = {"out": str(out), "format": fmt, "records": n, "head_seq": seq, "head_hash": h}
    if json:
        print_json(result)
    else:
        console.print(f"wrote {n} records to {out} (head #{seq} {h[:16]}...)", highlight=False)


def _anchors(values: list[str]) -> dict[int, str]:
    out: dict[int, str] = {}
    for v in values:
        seq, _, h = v.partition(":")
        if not seq.isdigit() or int(seq) < 1 or len(h) != 64 or any(c not in "0123456789abcdef" for c in h):
            fail(f"--anchor {v!r}: give SEQ:HASH, e.g. 42:<64 hex digits> (from `margin audit verify` or the "
                 "gateway's log)")
        out[int(seq)] = h
    return out


def _verify_file(path: Path, anchors: dict[int, str]) -> Verdict:
    if not path.is_file():
        fail(f"{path}: no such file")
    c = Checker(anchors)
    with path.open("rb") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = orjson.loads(line)
                if not isinstance(rec, dict) or "seq" not in rec:
                    raise ValueError("not an audit record")
            except ValueError as e:
                fail(f"{path}:{i}: {e} (export with `margin audit export --format jsonl`)")
                raise
            if not c.feed(rec):
                break
    return c.verdict()


@app.command("verify")
def verify(
    config: Path = CONFIG_OPT,
    anchor: list[str] = typer.Option([], "--anchor", help="SEQ:HASH kept elsewhere; repeatable"),
    file: Path | None = typer.Option(None, "--file", help="verify an export (jsonl) instead of the database"),
    json: bool = typer.Option(False, "--json"),
) -> None:
    """Recompute the hash chain; exit 1 naming the first record that was altered, deleted or spliced."""
    anchors = _anchors(anchor)
    v = _verify_file(file, anchors) if file is not None else _with_log(config, lambda log: log.verify(anchors))
    if json:
        print_json(v.as_dict())
    elif v.ok:
        console.print(f"audit chain verified: {v.records} records, head #{v.head_seq} {v.head_hash}",
                      highlight=False)
    if not v.ok:
        err_console.print(f"[bold red]error:[/] audit chain broken at record {v.bad_seq}: {v.reason}",
                          highlight=False)
        raise typer.Exit(1)
