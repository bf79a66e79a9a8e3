"""`/ui`: the dashboard, served by the gateway process itself (server-rendered Jinja2 pages, one
vendored chart library, no CDN, nothing fetched from outside).

The gateway calls `handle()` for every path under /ui. The UI sits below the gateway in the rooms
table, so it imports nothing from it: the gateway passes itself (`Host`: config, ledger store, key
ring, circuit breakers) and its admin API handler, through which every budget and key change goes,
exactly as `PUT /admin/budgets/{id}` or `POST /admin/keys` would."""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import parse_qsl, quote

import orjson

from margin.ui import pages
from margin.ui.core import SECURITY, AdminApi, Dashboard, Host, Problem, Reply, Request, redirect
from margin.ui.session import Session

_DASHBOARDS: dict[int, Dashboard] = {}


def dashboard(host: Host, admin_api: AdminApi) -> Dashboard:
    """One dashboard per gateway app, made at its first /ui request."""
    d = _DASHBOARDS.get(id(host))
    if d is None or d.host is not host:
        d = _DASHBOARDS[id(host)] = Dashboard(host, admin_api)
    return d


async def handle(host: Host, admin_api: AdminApi, method: str, path: str, scope: dict[str, Any],
                 headers: dict[str, str], body: bytes) -> Reply:
    """The gateway's entry point for every path under /ui."""
    t0 = time.perf_counter()
    query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True))
    secure = scope.get("scheme") == "https" or headers.get("x-forwarded-proto") == "https"
    client = scope.get("client") or ("", 0)
    req = Request(method, path, query, headers, body, secure, {}, str(client[0]))
    d = dashboard(host, admin_api)
    s: Session | None = None
    try:
        if path.startswith("/ui/static/"):
            return d.static_file(path.removeprefix("/ui/static/"))
        if path in ("/ui/login", "/ui/login/"):
            reply = await pages.login(d, req)
        elif (s := await d.session(req)) is not None:
            reply = await pages.route(d, req, s)
        elif path.startswith("/ui/api/") or path.endswith(".csv"):
            raise Problem(401, "Sign in first: your session is missing or has expired")
        else:
            target = path + (f"?{scope['query_string'].decode('latin-1')}" if scope.get("query_string") else "")
            reply = redirect("/ui/login?next=" + quote(target, safe=""))
    except Problem as p:
        if path.startswith("/ui/api/") or path.endswith(".csv"):
            reply = (p.status, [(b"content-type", b"application/json"), *SECURITY],
                     orjson.dumps({"error": p.message}))
        else:
            reply = d.error(req, s, p.status, p.message)
    total = (time.perf_counter() - t0) * 1000
    timing = ", ".join([f"total;dur={total:.1f}", *(f"{k};dur={v:.1f}" for k, v in req.timings.items())])
    return reply[0], [*reply[1], (b"server-timing", timing.encode())], reply[2]
