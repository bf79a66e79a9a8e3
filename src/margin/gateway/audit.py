"""Who changed what: the gateway's side of the audit log (the table and its chain: ledger/audit.py).

Admin changes (keys, budgets; through /admin or the dashboard) call `record` once the change is
stored. Routes, caps and everything else in margin.yaml change only with the file, so every start
of the gateway records the configuration: its hash, and what changed since the last recorded one.

What is recorded is a public view: never a key's secret or hash (keys: `public_view`), never a
configured secret (admin_key, provider api_key, passwords in URLs, secret-looking strings), so the
log can be shown and exported freely.

Who: "admin" for a holder of the admin key, "admin (dashboard)" for a change made in the dashboard
(only admins can change anything there), the host user and pid for a configuration loaded at start.
Address: the client address from the ASGI scope (behind a proxy, uvicorn's proxy headers decide it:
by default it trusts X-Forwarded-For from 127.0.0.1 only)."""

from __future__ import annotations

import asyncio
import getpass
import hashlib
import logging
import os
import re
import socket
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import orjson

from margin.gateway.errors import BadRequest, MethodNotAllowed
from margin.gateway.payloads import redact_obj
from margin.gateway.pipeline import JSON_HEADERS, Headers
from margin.ledger.audit import MAX_SEQ, AuditLog, Query, decoded, ts_text
from margin.tasks import cancel_and_wait

if TYPE_CHECKING:
    from margin.config import Config
    from margin.gateway.app import MarginApp

log = logging.getLogger("margin.audit")
CONFIG_TARGET = "config"
_FULL = ("config.initial", "config.changed")  # records whose `after` holds the whole configuration
# Set for the duration of one /ui request (each ASGI request runs in its own task, so its own context).
_DASHBOARD: ContextVar[str | None] = ContextVar("margin_audit_dashboard", default=None)
_SECRET_NAME = re.compile(r"^(?:.*_)?(?:key|secret|password|token|credentials?)$")
_NOT_SECRET = frozenset({"key"})  # a budget/rate-limit scope's `key` names a key id, not a secret


@dataclass(frozen=True)
class Who:
    actor: str
    address: str | None


def client_address(scope: dict[str, Any] | None) -> str | None:
    client = (scope or {}).get("client")
    return str(client[0]) if client else None


def via_dashboard(scope: dict[str, Any]) -> None:
    """Mark the current request as the dashboard's: admin changes it makes are attributed to it."""
    _DASHBOARD.set(client_address(scope) or "")


def who(scope: dict[str, Any] | None) -> Who:
    """The actor and address of an admin request (`scope` None: an in-process call, e.g. the dashboard)."""
    dash = _DASHBOARD.get()
    if scope is None and dash is not None:
        return Who("admin (dashboard)", dash or None)
    return Who("admin", client_address(scope))


# -- public views of configuration ----------------------------------------------------------------

def _url(text: str) -> str:
    """A URL with its password (if any) replaced."""
    try:
        u = urlsplit(text)
        if not u.password:
            return text
        host = u.hostname or ""
        netloc = f"{u.username or ''}:[REDACTED]@{host}" + (f":{u.port}" if u.port else "")
        return urlunsplit((u.scheme, netloc, u.path, u.query, u.fragment))
    except ValueError:
        return "[REDACTED:unparseable_url]"


def sanitize(obj: Any, name: str = "") -> Any:
    """A JSON value with secrets removed: secret-named fields, URL passwords, secret-looking strings."""
    if isinstance(obj, dict):
        return {k: sanitize(v, str(k)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [sanitize(v, name) for v in obj]
    if isinstance(obj, str):
        if obj and _SECRET_NAME.match(name.lower()) and name.lower() not in _NOT_SECRET:
            return "[REDACTED]"
        return str(redact_obj(_url(obj) if "://" in obj and "@" in obj else obj))
    return obj


def config_view(cfg: Config) -> dict[str, Any]:
    view: dict[str, Any] = sanitize(cfg.model_dump(mode="json"))
    return view


def config_hash(view: dict[str, Any]) -> str:
    return hashlib.sha256(orjson.dumps(view, option=orjson.OPT_SORT_KEYS)).hexdigest()


def _ident(items: list[Any]) -> list[str] | None:
    """Stable labels for a list of objects named by `name` or `id` (so reordering is not a change)."""
    for field in ("name", "id"):
        if items and all(isinstance(i, dict) and isinstance(i.get(field), str) and i[field] for i in items):
            labels = [str(i[field]) for i in items]
            if len(set(labels)) == len(labels):
                return labels
    return None


def flatten(obj: Any, path: str = "") -> dict[str, Any]:
    """{"a.b[name].c": leaf}: one entry per leaf (empty containers are leaves)."""
    if isinstance(obj, dict) and obj:
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(flatten(v, f"{path}.{k}" if path else str(k)))
        return out
    if isinstance(obj, list) and obj:
        labels = _ident(obj) or [str(i) for i in range(len(obj))]
        out = {}
        for label, v in zip(labels, obj, strict=True):
            out.update(flatten(v, f"{path}[{label}]"))
        return out
    return {path: obj}


def diff(old: dict[str, Any], new: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(before, after) of the paths whose value differs; a path only on one side is absent on the other."""
    a, b = flatten(old), flatten(new)
    changed = sorted(p for p in a.keys() | b.keys() if a.get(p, ...) != b.get(p, ...))
    return {p: a[p] for p in changed if p in a}, {p: b[p] for p in changed if p in b}


def _section(path: str) -> str:
    return re.split(r"[.\[]", path, maxsplit=1)[0]


# -- recording --------------------------------------------------------------------------------------

class Auditor:
    """The gateway's handle on the audit log; `app.audit`."""

    def __init__(self, ledger_url: str, retries: int = 3):
        self.log = AuditLog(ledger_url)
        self.retries = retries
        self.written = 0
        self.lost = 0
        self._config_task: asyncio.Task[None] | None = None

    async def start(self, cfg: Config) -> None:
        """Record this start's configuration; if the store is down, keep trying in the background."""
        try:
            await self.log.open()
            await self.record_config(cfg)
        except Exception as e:
            log.error("audit: could not record the configuration at start-up (%s: %s); retrying",
                      type(e).__name__, e)
            self._config_task = asyncio.create_task(self._retry_config(cfg), name="audit-config")

    async def _retry_config(self, cfg: Config, delay_s: float = 1.0) -> None:
        while True:
            await asyncio.sleep(delay_s)
            try:
                await self.log.open()
                await self.record_config(cfg)
                return
            except Exception as e:
                log.warning("audit: configuration still not recorded: %s: %s", type(e).__name__, e)
                delay_s = min(30.0, delay_s * 2)

    async def close(self) -> None:
        await cancel_and_wait(self._config_task)
        await self.log.close()

    async def record_config(self, cfg: Config) -> dict[str, Any]:
        view = config_view(cfg)
        h = config_hash(view)
        last = await self.log.last(CONFIG_TARGET, _FULL)
        actor = f"{user()}@{socket.gethostname()} (margin serve, pid {os.getpid()})"
        if last is None:
            return await self.append(Who(actor, socket.gethostname()), "config.initial", CONFIG_TARGET, None,
                                     {"hash": h, "config": view})
        prev = orjson.loads(last["after"] or "{}")
        if prev.get("hash") == h:
            return await self.append(Who(actor, socket.gethostname()), "config.unchanged", CONFIG_TARGET,
                                     None, {"hash": h, "same_as_seq": int(last["seq"])})
        before, after = diff(prev.get("config") or {}, view)
        sections = sorted({_section(p) for p in (*before, *after)})
        return await self.append(Who(actor, socket.gethostname()), "config.changed", CONFIG_TARGET,
                                 {"hash": prev.get("hash"), "seq": int(last["seq"]), "changed": before},
                                 {"hash": h, "sections": sections, "changed": after, "config": view})

    async def append(self, w: Who, action: str, target: str, before: Any, after: Any) -> dict[str, Any]:
        await self.log.open()  # no-op once open; reopens after a store that was down at start-up
        rec = await self.log.append(w.actor, action, target, before, after, w.address)
        self.written += 1
        # The head's hash in the gateway's log is an anchor kept outside the database (`verify --anchor`).
        log.info("audit #%d %s %s by %s: %s", rec["seq"], action, target, w.actor, rec["hash"])
        return rec

    async def record(self, w: Who, action: str, target: str, before: Any, after: Any) -> None:
        """Append a change that is already stored; retried briefly. If the store stays down the change
        still happened, so the record goes to the error log instead of being dropped silently."""
        before, after = sanitize(before), sanitize(after)
        if before == after:
            return  # nothing changed (e.g. revoking a revoked key)
        for attempt in range(self.retries):
            try:
                await self.append(w, action, target, before, after)
                return
            except Exception as e:
                if attempt + 1 == self.retries:
                    self.lost += 1
                    log.error("audit: record NOT stored (%s: %s): %s", type(e).__name__, e,
                              orjson.dumps({"actor": w.actor, "action": action, "target": target, "before": before,
                                            "after": after, "address": w.address}, default=str).decode())
                    return
                await asyncio.sleep(0.1 * 2**attempt)


def user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers)
        return f"uid {os.getuid()}"


async def record(app: MarginApp, w: Who | None, action: str, target: str, before: Any, after: Any) -> None:
    """The hook admin.py and budget_admin.py call after each change they store."""
    auditor: Auditor | None = getattr(app, "audit", None)
    if auditor is not None:
        await auditor.record(w or Who("admin", None), action, target, before, after)


async def budget_before(app: MarginApp, budget_id: str) -> Any:
    """The definition in force before a change, from the store (fresher than this replica's copy)."""
    for r in await app.store.list_budgets():
        if r["id"] == budget_id:
            return orjson.loads(r["body"]) if r["body"] is not None else None
    cfg = app.guard.config_budgets.get(budget_id)
    return cfg.model_dump(mode="json") if cfg is not None else None


# -- GET /admin/audit ---------------------------------------------------------------------------------

def _query(scope: dict[str, Any] | None, path: str) -> dict[str, str]:
    raw = (scope or {}).get("query_string", b"").decode("latin-1") if scope else path.partition("?")[2]
    return dict(parse_qsl(raw, keep_blank_values=False))


def _whole(raw: str, name: str, lo: int, hi: int) -> int:
    if not (raw.isascii() and raw.isdigit() and lo <= int(raw) <= hi):
        raise BadRequest(f"{name} must be a whole number from {lo} to {hi}, not {raw[:40]!r}", param=name,
                         code="invalid_value")
    return int(raw)


async def handle(app: MarginApp, method: str, path: str, scope: dict[str, Any] | None) -> tuple[int, Headers, bytes]:
    """`GET /admin/audit[?since=7d&target=..&action=key.*&actor=..&before_seq=N&limit=100]` lists records,
    newest first; `GET /admin/audit/verify` recomputes the chain. In-process callers (the dashboard)
    may put the query in the path."""
    from margin.analytics.filters import parse_since

    if method != "GET":
        raise MethodNotAllowed("/admin/audit takes GET")
    auditor: Auditor | None = getattr(app, "audit", None)
    if auditor is None:
        raise BadRequest("The audit log is not enabled in this gateway", code="audit_disabled")
    q = _query(scope, path)
    if path.partition("?")[0].rstrip("/").endswith("/verify"):
        v = await auditor.log.verify()
        return 200, JSON_HEADERS, orjson.dumps(v.as_dict())
    try:
        since = ts_text(parse_since(q["since"])) if q.get("since") else None
    except ValueError as e:
        raise BadRequest(f"Invalid audit query: {e}", param="since", code="invalid_value") from None
    limit = _whole(q.get("limit", "100"), "limit", 1, 1000)
    before_seq = _whole(q["before_seq"], "before_seq", 1, MAX_SEQ) if q.get("before_seq") else None
    rows = await auditor.log.query(Query(since=since, target=q.get("target"), action=q.get("action"),
                                         actor=q.get("actor"), before_seq=before_seq, limit=limit))
    seq, h = await auditor.log.head()
    data = [decoded(r) for r in rows]
    return 200, JSON_HEADERS, orjson.dumps({"object": "list", "data": data, "head": {"seq": seq, "hash": h},
                                            "has_more": len(rows) == limit})
