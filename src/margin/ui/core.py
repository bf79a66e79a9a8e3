"""The dashboard's machinery: the warehouse it reads, sessions, CSRF, the admin API it writes
through, and HTML/static responses. Pages are in pages.py, the gateway's entry point in web.py."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import mimetypes
import os
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qsl

import orjson
from jinja2 import Environment, FileSystemLoader, select_autoescape

from margin.analytics.warehouse import Warehouse
from margin.state.base import StateUnavailable
from margin.ui import fmt
from margin.ui.params import BUCKETS, BY_CHOICES, FILTER_DIMS, PERIODS
from margin.ui.session import (
    COOKIE,
    LOGIN_COOKIE,
    Session,
    Signer,
    SignInThrottle,
    cookie,
    is_viewer_key,
    read_cookies,
)

log = logging.getLogger("margin.ui")
Headers = list[tuple[bytes, bytes]]
Reply = tuple[int, Headers, bytes]
AdminApi = Callable[[Any, str, str, dict[str, str], bytes], Awaitable[Reply]]

HERE = Path(__file__).parent
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "font-src 'self'; object-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")
SECURITY = [(b"content-security-policy", CSP.encode()), (b"x-content-type-options", b"nosniff"),
            (b"x-frame-options", b"DENY"), (b"referrer-policy", b"same-origin")]
REFRESH_S = 1.0  # the warehouse reads new ledger rows at most this often
WAIT_S = 1.5  # the longest a page waits for a running refresh before rendering what is there
RESULTS_KEPT = 256
SIGNED_OUT = "ui:signed-out:"  # shared-state marker per signed-out session nonce
MAX_STALE_S = 5.0  # how far behind the ledger a page may be (MARGIN_UI_MAX_STALE_S; 0: never behind)
NAV = (("overview", "Overview"), ("spend", "Spend"), ("budgets", "Budgets"), ("outcomes", "Outcomes"),
       ("routing", "Routing & runs"), ("pools", "Pools"), ("keys", "Keys"), ("audit", "Audit log"))
ADMIN_PAGES = frozenset({"keys", "audit", "pools"})  # a team viewer neither sees nor opens these


class Host(Protocol):
    """What the dashboard uses of the gateway (MarginApp)."""

    cfg: Any
    store: Any
    keys: Any
    breakers: Any
    providers: dict[str, Any]

    @property
    def state(self) -> Any:  # the budget state (margin.state): shared by replicas when it is Redis
        ...


class Problem(Exception):
    """A request the page cannot serve: its status and a message for the person."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    secure: bool
    timings: dict[str, float]
    client: str = ""  # the peer's address (the socket's, not X-Forwarded-For, which a client can write)

    def form(self) -> dict[str, str]:
        if not self.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
            raise Problem(415, "Forms must be sent as application/x-www-form-urlencoded")
        return dict(parse_qsl(self.body.decode("utf-8", "replace"), keep_blank_values=True))


class Admin:
    """The gateway's admin API, called in-process with the configured admin key."""

    def __init__(self, host: Host, api: AdminApi):
        self.host, self.api = host, api

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        if not self.host.cfg.admin_key:
            return 403, {"error": "the admin API is disabled (no admin_key in margin.yaml)"}
        headers = {"authorization": f"Bearer {self.host.cfg.admin_key}", "content-type": "application/json"}
        try:
            status, _, payload = await self.api(self.host, method, path, headers,
                                                orjson.dumps(body) if body is not None else b"")
        except Exception as e:  # the admin API's GatewayError: keep its status and precise message
            status_, message = getattr(e, "status", None), getattr(e, "message", None)
            if status_ is None or message is None:
                raise
            return int(status_), {"error": str(message)}
        return status, orjson.loads(payload)


class Dashboard:
    def __init__(self, host: Host, admin_api: AdminApi, warehouse_path: str | None = None):
        self.host = host
        self.admin = Admin(host, admin_api)
        self.signer = Signer.for_gateway(host.cfg.admin_key)
        self.env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(),
                               trim_blocks=True, lstrip_blocks=True)
        self.env.filters.update(fmt.FILTERS)
        self.static = {p.name: p.read_bytes() for p in (HERE / "static").iterdir() if p.is_file()}
        path = warehouse_path if warehouse_path is not None else os.environ.get("MARGIN_UI_WAREHOUSE", "")
        self.wh = _open_warehouse(host.cfg.ledger.url, path)
        self._sync: asyncio.Task[None] | None = None
        self.version = 0  # bumped whenever a refresh brought new ledger rows
        # key -> (version, computed at, on a complete copy, result)
        self._results: OrderedDict[str, tuple[int, float, bool, Any]] = OrderedDict()
        self._recomputing: dict[str, asyncio.Task[None]] = {}
        self.max_stale_s = float(os.environ.get("MARGIN_UI_MAX_STALE_S", MAX_STALE_S))
        self._last_sync = 0.0
        self._synced_at = 0.0
        self.synced_once = False
        self.sync_error = ""
        self._revoked: dict[str, int] = {}  # nonces of sessions signed out here (until they expire)
        self.throttle = SignInThrottle()
        self._state_warned = 0.0
        from margin.ui.budgets import Forecasts

        self.forecasts = Forecasts()

    # -- the warehouse --------------------------------------------------------------------------
    async def _refresh(self) -> None:
        try:
            stats = await self.wh.refresh(self.host.store)
            if stats.events or stats.outcomes or stats.rebuilt or not self.synced_once:
                self.version += 1
            self.synced_once, self.sync_error = True, ""
            self._synced_at = time.monotonic()
        except Exception as e:  # the ledger is down: serve what the warehouse has, and say so
            self.sync_error = f"could not read new ledger rows: {e}"
            log.warning("dashboard: %s", self.sync_error)
        finally:
            self._last_sync = time.monotonic()

    async def fresh(self, req: Request | None = None) -> None:
        """Read ledger rows committed since the last look, at most every REFRESH_S. A page waits
        for that (at most WAIT_S) only when the copy it would show is older than max_stale_s;
        otherwise the refresh goes on in the background and the page shows the copy as it is."""
        t = time.perf_counter()
        if (self._sync is None or self._sync.done()) and time.monotonic() - self._last_sync >= REFRESH_S:
            self._sync = asyncio.create_task(self._refresh(), name="ui-warehouse-refresh")
        stale = not self.synced_once or time.monotonic() - self._synced_at > self.max_stale_s
        if stale and self._sync is not None and not self._sync.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._sync), WAIT_S)
        if req is not None:
            req.timings["sync"] = (time.perf_counter() - t) * 1000

    async def run(self, req: Request, name: str, fn: Callable[..., Any], *args: Any) -> Any:
        """A blocking query function in a worker thread (the event loop serves model calls).
        Results are kept per (function, arguments): reused as long as the warehouse has no new rows,
        and, once it has, for at most max_stale_s more while a recomputation runs in the
        background (stale-while-revalidate), so a page under live traffic does not wait for it."""
        t = time.perf_counter()
        key = f"{fn.__module__}.{fn.__qualname__}{[a for a in args if not isinstance(a, Warehouse | Dashboard)]!r}"
        hit = self._results.get(key)
        try:
            # a result of the first, partial copy of the ledger is never served once it is stale
            fresh_enough = hit is not None and hit[2] and time.monotonic() - hit[1] <= self.max_stale_s
            if hit is not None and (hit[0] == self.version or fresh_enough):
                self._results.move_to_end(key)
                req.timings["cached"] = 0.0
                if hit[0] != self.version and key not in self._recomputing:
                    self._recomputing[key] = asyncio.create_task(self._background(key, fn, args))
                return hit[3]
            return await self._compute(key, fn, args)
        finally:
            req.timings[name] = req.timings.get(name, 0.0) + (time.perf_counter() - t) * 1000

    async def _background(self, key: str, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        try:
            await self._compute(key, fn, args)
        except Exception as e:  # the next view computes in the foreground and shows the error
            log.warning("dashboard: background recomputation of %s failed: %s", fn.__qualname__, e)

    async def _compute(self, key: str, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        version, at, complete = self.version, time.monotonic(), self.synced_once
        try:
            out = await asyncio.to_thread(fn, *args)
        finally:
            self._recomputing.pop(key, None)
        self._results[key] = (version, at, complete, out)
        while len(self._results) > RESULTS_KEPT:
            self._results.popitem(last=False)
        return out

    # -- sessions -------------------------------------------------------------------------------
    async def session(self, req: Request) -> Session | None:
        now = time.time()
        s = self.signer.session(read_cookies(req.headers.get("cookie")).get(COOKIE), now)
        if s is None or s.nonce in self._revoked or await self._signed_out_elsewhere(s, now):
            return None
        if s.is_admin:
            key = self.host.cfg.admin_key
            ok = bool(key) and hmac.compare_digest(s.admin_fp.encode(), self.signer.fingerprint(key).encode())
            return s if ok else None
        try:  # read the key again: a revoked or re-scoped viewer key ends the session now
            row = await self.host.store.key_by_id(s.key_id)
        except Exception:
            raise Problem(503, "The key store is unavailable; try again shortly") from None
        if row is None or row.get("revoked_at"):
            return None
        tags = orjson.loads(row["tags"]) if row.get("tags") else {}
        team = str(row.get("team") or "")
        if not is_viewer_key(tags, team):
            return None
        return s if team == s.team else replace(s, team=team)

    async def _signed_out_elsewhere(self, s: Session, now: float) -> bool:
        try:
            return bool(await self.host.state.flagged(SIGNED_OUT + s.nonce, now))
        except StateUnavailable as e:  # this replica's own sign-outs still hold
            if now - self._state_warned > 60:  # once a minute, not on every page
                self._state_warned = now
                log.warning("dashboard: cannot read sign-outs from the shared state: %s", e)
            return False

    async def sign_out(self, s: Session) -> None:
        """Refuse the session from now on: here at once, on every replica through the shared state."""
        now = int(time.time())
        self._revoked = {n: exp for n, exp in self._revoked.items() if exp > now}
        self._revoked[s.nonce] = s.expires
        try:
            await self.host.state.flag(SIGNED_OUT + s.nonce, float(s.expires))
        except StateUnavailable as e:
            log.warning("dashboard: sign-out recorded on this replica only: %s", e)

    def check_csrf(self, req: Request, s: Session, form: dict[str, str]) -> None:
        origin = req.headers.get("origin")
        if origin and origin != "null":
            host = req.headers.get("host", "")
            if origin.split("://", 1)[-1] != host:
                raise Problem(403, f"Cross-origin form post refused (Origin {origin})")
        if not self.signer.csrf_ok(s.nonce, form.get("csrf")):
            raise Problem(403, "The form's security token is missing or stale: reload the page and try again")

    # -- responses ------------------------------------------------------------------------------
    def html(self, req: Request, template: str, ctx: dict[str, Any], status: int = 200,
             extra: Headers | None = None) -> Reply:
        t = time.perf_counter()
        body = self.env.get_template(template).render(**ctx).encode()
        req.timings["render"] = (time.perf_counter() - t) * 1000
        return status, [(b"content-type", b"text/html; charset=utf-8"), (b"cache-control", b"no-store"),
                        *SECURITY, *(extra or [])], body

    def base(self, req: Request, s: Session | None, page: str) -> dict[str, Any]:
        return {"s": s, "page": page, "csrf": self.signer.csrf(s.nonce) if s else "", "req": req,
                "syncing": not self.synced_once, "sync_error": self.sync_error,
                "events_loaded": self.wh.counts()["events"] if not self.synced_once else None}

    def ctx(self, req: Request, s: Session, page: str, v: Any = None, **kw: Any) -> dict[str, Any]:
        """What every signed-in page's template gets: the navigation for this role, the view, the pickers."""
        nav = [(k, t) for k, t in NAV if s.is_admin or k not in ADMIN_PAGES]
        if not getattr(getattr(self.host, "pools", None), "pools", None):
            nav = [(k, t) for k, t in nav if k != "pools"]  # no self-hosted pool configured
        return {**self.base(req, s, page), "nav": nav, "view": v, "periods": PERIODS, "bucket_choices": BUCKETS,
                "by_choices": BY_CHOICES, "filter_dims": FILTER_DIMS, "chart_json": lambda c: orjson.dumps(c).decode(),
                **kw}

    def error(self, req: Request, s: Session | None, status: int, message: str) -> Reply:
        return self.html(req, "error.html", {**self.base(req, s, ""), "status": status, "message": message}, status)

    def static_file(self, name: str) -> Reply:
        data = self.static.get(name)
        if data is None:
            raise Problem(404, f"No static file {name}")
        ctype = mimetypes.guess_type(name)[0] or "application/octet-stream"
        if ctype.startswith("text/") or ctype.endswith("javascript"):
            ctype += "; charset=utf-8"
        return 200, [(b"content-type", ctype.encode()), (b"cache-control", b"public, max-age=3600"),
                     (b"x-content-type-options", b"nosniff")], data

    def set_session(self, s: Session, secure: bool) -> Headers:
        return [(b"set-cookie", cookie(COOKIE, self.signer.issue(s), max(0, s.expires - int(time.time())), secure)),
                (b"set-cookie", cookie(LOGIN_COOKIE, "", 0, secure))]


def redirect(location: str, extra: Headers | None = None) -> Reply:
    return 303, [(b"location", location.encode()), (b"cache-control", b"no-store"), *(extra or [])], b""


def _open_warehouse(ledger_url: str, path: str) -> Warehouse:
    """In memory by default (one per gateway process); a file (MARGIN_UI_WAREHOUSE) keeps the copy
    between restarts. A file another process holds falls back to memory."""
    if path and path != ":memory:":
        try:
            return Warehouse(ledger_url, path)
        except Exception as e:
            log.warning("dashboard: warehouse file %s unavailable (%s); using memory", path, e)
    return Warehouse(ledger_url)
