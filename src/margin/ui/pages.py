"""The dashboard's pages: each reads its parameters, runs its queries in a worker thread with the
session's team restriction in the Filter, and renders a template."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from margin.analytics import actions as act
from margin.analytics.outcomes import baselines
from margin.ui import admin_pages, data, fmt
from margin.ui import budgets as bud
from margin.ui.core import Dashboard, Problem, Reply, Request, redirect
from margin.ui.params import View, make_filter, parse_by, parse_view
from margin.ui.session import LOGIN_COOKIE, Session, cookie, read_cookies, sign_in


def _next(target: str) -> str:
    """Only a local dashboard path may be a redirect target (no open redirect)."""
    ok = (target.startswith("/ui/") and "\\" not in target and target.isprintable() and " " not in target
          and not target.startswith("/ui/login"))
    return target if ok else "/ui/overview"


async def login(d: Dashboard, req: Request) -> Reply:
    now = time.time()
    if req.method == "GET":
        token, nonce = d.signer.new_login(now)
        ctx = {**d.base(req, None, "login"), "csrf": d.signer.csrf("login:" + nonce), "next": req.query.get("next", "")}
        return d.html(req, "login.html", ctx, extra=[(b"set-cookie", cookie(LOGIN_COOKIE, token, 1800, req.secure))])
    if req.method != "POST":
        raise Problem(405, "The sign-in page takes GET or POST")
    form = req.form()
    bound = d.signer.login_nonce(read_cookies(req.headers.get("cookie")).get(LOGIN_COOKIE), now)
    if bound is None or not d.signer.csrf_ok("login:" + bound, form.get("csrf")):
        raise Problem(403, "The sign-in form expired or was not sent from this page: reload it and try again")
    wait = d.throttle.retry_after(req.client, now)
    if wait is not None:
        raise Problem(429, f"Too many failed sign-ins from your address: try again in {max(1, round(wait))} s")
    d.throttle.attempt(req.client, now)  # before the lookup: parallel guesses all count
    result = await sign_in(form.get("key", ""), d.host.cfg.admin_key, d.host.keys.lookup, d.signer, now)
    if isinstance(result, str):
        ctx = {**d.base(req, None, "login"), "csrf": form.get("csrf", ""), "next": form.get("next", ""),
               "failure": result}
        return d.html(req, "login.html", ctx, status=401)
    d.throttle.succeeded(req.client, now)
    return redirect(_next(form.get("next", "")), d.set_session(result, req.secure))


async def route(d: Dashboard, req: Request, s: Session) -> Reply:
    p = req.path.rstrip("/")
    if p == "/ui":
        return redirect("/ui/overview")
    if p == "/ui/logout":
        if req.method != "POST":
            raise Problem(405, "Sign out with the button (POST)")
        d.check_csrf(req, s, req.form())
        await d.sign_out(s)
        return redirect("/ui/login", [(b"set-cookie", cookie("margin_ui", "", 0, req.secure))])
    handler = PAGES.get(p)
    if handler is None:
        raise Problem(404, f"No dashboard page {req.path}")
    if req.method == "POST":
        if p not in FORM_PAGES:
            raise Problem(405, f"{req.path} takes GET")
        form = req.form()
        d.check_csrf(req, s, form)
        return await handler(d, req, s, form)
    if req.method != "GET":
        raise Problem(405, f"{req.path} takes GET or POST")
    return await handler(d, req, s, None)


def clock() -> datetime:
    """Now, rounded up to the next minute: every page of the same minute asks for the same window,
    so an unchanged warehouse answers from its result cache (nothing lies after now anyway)."""
    t = datetime.now(UTC)
    return t.replace(second=0, microsecond=0) + timedelta(minutes=1)


def _view(req: Request, s: Session, default: str) -> View:
    try:
        return parse_view(req.query, clock(), default, viewer=not s.is_admin)
    except ValueError as e:
        raise Problem(400, str(e)) from None


def _team(s: Session) -> str | None:
    return None if s.is_admin else s.team


def _ctx(d: Dashboard, req: Request, s: Session, page: str, v: View | None = None, **kw: Any) -> dict[str, Any]:
    return d.ctx(req, s, page, v, **kw)


async def _alerts(d: Dashboard, s: Session) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Threshold notifications this gateway sent (visible budgets only) and budget names."""
    status, body = await d.admin.call("GET", "/admin/budgets")
    if status != 200:
        return [], {}
    seen = [b for b in (bud.visible(x, _team(s)) for x in body["data"]) if b]
    names = {b["id"]: b.get("name") or b["id"] for b in body["data"]}
    return sorted((f for b in seen for f in b.get("fired", [])), key=lambda f: f["at"], reverse=True)[:8], names


def _overview_data(wh: Any, f: Any, now: datetime, bucket: str) -> dict[str, Any]:
    o = data.overview(wh, f, now, bucket)
    assert f.since is not None
    o["actions"] = act.budget_actions(wh, f, f.since)
    return o


def _overview_fields(o: dict[str, Any]) -> dict[str, str]:
    h = o["head"]
    return {"spend_today": fmt.money(h["spend_today_usd"]), "spend_yesterday": fmt.money(h["spend_yesterday_usd"]),
            "spend_mtd": fmt.money(h["spend_month_to_date_usd"]), "month_change": fmt.change(h["month_change"]),
            "spend_last_month": fmt.money(h["spend_last_month_usd"]), "spend_range": fmt.money(h["cost_usd"]),
            "requests": fmt.num(h["requests"]), "users": fmt.num(h["users"]),
            "tokens": fmt.compact(int(h["input_tokens"]) + int(h["output_tokens"])),
            "p50": fmt.ms(h["p50_ms"]), "p95": fmt.ms(h["p95_ms"]), "error_rate": fmt.pct(h["error_rate"]),
            "cache_hit_rate": fmt.pct(h["cache_hit_rate"]), "saved_total": fmt.money(o["saved_total_usd"])}


async def overview(d: Dashboard, req: Request, s: Session, form: dict[str, str] | None) -> Reply:
    v = _view(req, s, "24h")
    await d.fresh(req)
    o = await d.run(req, "queries", _overview_data, d.wh, make_filter(v, _team(s)), clock(), v.bucket)
    alerts, names = await _alerts(d, s)
    return d.html(req, "overview.html", _ctx(d, req, s, "overview", v, o=o, fields=_overview_fields(o),
                                             alerts=alerts, names=names))


async def api_overview(d: Dashboard, req: Request, s: Session, form: dict[str, str] | None) -> Reply:
    """The overview's live refresh: the same numbers, formatted, and the chart."""
    v = _view(req, s, "24h")
    await d.fresh(req)
    o = await d.run(req, "queries", _overview_data, d.wh, make_filter(v, _team(s)), clock(), v.bucket)
    body = {"fields": _overview_fields(o), "charts": {"spend": o["spend_chart"], "levers": o["lever_chart"]},
            "levers": [{"lever": x["lever"], "saved": fmt.money(x["saved_usd"])} for x in o["levers"]],
            "updated": datetime.now(UTC).isoformat(timespec="seconds")}
    return 200, [(b"content-type", b"application/json"), (b"cache-control", b"no-store")], orjson.dumps(body)


async def api_status(d: Dashboard, req: Request, s: Session, form: dict[str, str] | None) -> Reply:
    """Whether the warehouse has caught up with the ledger (the first copy of a big ledger takes a while)."""
    await d.fresh(req)
    body = {"synced": d.synced_once, "version": d.version, "error": d.sync_error or None, **d.wh.counts()}
    return 200, [(b"content-type", b"application/json"), (b"cache-control", b"no-store")], orjson.dumps(body)


async def spend(d: Dashboard, req: Request, s: Session, form: dict[str, str] | None) -> Reply:
    v = _view(req, s, "7d")
    try:
        by = parse_by(req.query.get("by"))
        top_by = parse_by(req.query.get("top"), "user")
    except ValueError as e:
        raise Problem(400, str(e)) from None
    await d.fresh(req)
    sp = await d.run(req, "queries", data.spend, d.wh, make_filter(v, _team(s)), by, v.bucket, top_by)
    return d.html(req, "spend.html", _ctx(d, req, s, "spend", v, sp=sp, by=by, top_by=top_by))


async def spend_csv(d: Dashboard, req: Request, s: Session, form: dict[str, str] | None) -> Reply:
    v = _view(req, s, "7d")
    try:
        by = parse_by(req.query.get("by"))
    except ValueError as e:
        raise Problem(400, str(e)) from None
    await d.fresh(req)
    text = await d.run(req, "queries", data.spend_csv, d.wh, make_filter(v, _team(s)), by, v.bucket)
    name = f"margin-spend-{v.period}-{by.replace(':', '-')}.csv"
    return 200, [(b"content-type", b"text/csv; charset=utf-8"), (b"cache-control", b"no-store"),
                 (b"content-disposition", f'attachment; filename="{name}"'.encode())], text.encode()


def _budget_data(d: Dashboard, f: Any, visible: list[dict[str, Any]], now: datetime) -> dict[str, Any]:
    return {"burn": {b["id"]: bud.burn(d.wh, f, b, now, d.forecasts) for b in visible},
            "actions": bud.fired_actions(d.wh, f, visible)}


async def budgets(d: Dashboard, req: Request, s: Session, form: dict[str, str] | None) -> Reply:
    failure, saved, status_code = "", req.query.get("saved", ""), 200
    if form is not None:
        if not s.is_admin:
            raise Problem(403, "Only an admin can change budgets")
        failure, saved = await _save_budget(d, form)
        if not failure:
            return redirect(f"/ui/budgets?saved={saved}#budget-{saved}")
        status_code = 400
    status, body = await d.admin.call("GET", "/admin/budgets")
    if status != 200:
        raise Problem(503, f"Budget status is unavailable: {body.get('error')}")
    visible = [b for b in (bud.visible(x, _team(s)) for x in body["data"]) if b]
    await d.fresh(req)
    f = make_filter(_view(req, s, "7d"), _team(s))
    extra = await d.run(req, "queries", _budget_data, d, f, [bud.shape(b) for b in visible], clock())
    texts = {b["id"]: bud.thresholds_text(b.get("thresholds", [])) for b in visible}
    return d.html(req, "budgets.html", _ctx(d, req, s, "budgets", None, budgets=visible, texts=texts, failure=failure,
                                            form=form or {}, saved=saved, **extra), status=status_code)


async def _save_budget(d: Dashboard, form: dict[str, str]) -> tuple[str, str]:
    """(failure message or "", budget id). Every change goes through the admin API."""
    bid = form.get("id", "").strip()
    if form.get("action") == "delete":
        status, body = await d.admin.call("DELETE", f"/admin/budgets/{bid}")
        return ("" if status == 200 else body.get("error", f"HTTP {status}")), bid
    status, body = await d.admin.call("GET", f"/admin/budgets/{bid}") if bid and form.get("mode") == "edit" else (
        404, {})
    current = body if status == 200 else None
    if form.get("mode") == "edit" and current is None:
        return f"No budget with id {bid!r} (deleted meanwhile?)", bid
    try:
        payload = bud.budget_body(form, current)
    except ValueError as e:
        return str(e), bid
    if not payload["thresholds"]:
        payload.pop("thresholds")  # none given: the default, block at 100%
    status, body = await d.admin.call("PUT", f"/admin/budgets/{payload['id']}", payload)
    return ("" if status == 200 else body.get("error", f"HTTP {status}")), payload["id"]


async def outcomes(d: Dashboard, req: Request, s: Session, form: dict[str, str] | None) -> Reply:
    v = _view(req, s, "30d")
    await d.fresh(req)
    fixed, periods = baselines(getattr(d.host.cfg, "workflows", []))
    o = await d.run(req, "queries", data.outcomes, d.wh, make_filter(v, _team(s)), v.bucket, fixed, periods)
    names = {w.name: w.outcome for w in getattr(d.host.cfg, "workflows", [])}
    return d.html(req, "outcomes.html", _ctx(d, req, s, "outcomes", v, o=o, outcome_names=names))


async def routing(d: Dashboard, req: Request, s: Session, form: dict[str, str] | None) -> Reply:
    v = _view(req, s, "7d")
    await d.fresh(req)
    rt = await d.run(req, "queries", data.routing, d.wh, make_filter(v, _team(s)))
    states = d.host.breakers.snapshot()
    circuits = [{"provider": p, "state": states.get(p, "closed")} for p in sorted(d.host.providers)]
    return d.html(req, "routing.html", _ctx(d, req, s, "routing", v, rt=rt, circuits=circuits))


async def run_page(d: Dashboard, req: Request, s: Session, form: dict[str, str] | None) -> Reply:
    run_id = req.query.get("id", "")
    if not run_id or len(run_id) > 200:
        raise Problem(400, "Give the run id: /ui/run?id=<run id> (at most 200 characters)")
    await d.fresh(req)
    rd = await d.run(req, "queries", data.run_detail, d.wh, run_id, make_filter(_view(req, s, "7d"), _team(s)))
    if not rd["steps"]:
        raise Problem(404, f"No calls of run {run_id!r} are visible to you")
    return d.html(req, "run.html", _ctx(d, req, s, "routing", None, run_id=run_id, rd=rd))


def _tags(text: str) -> dict[str, str]:
    out = {}
    for part in text.split(","):
        if part.strip():
            k, sep, v = part.partition("=")
            if not sep or not k.strip():
                raise ValueError(f"tag {part.strip()!r}: use name=value, e.g. feature=search")
            out[k.strip()] = v.strip()
    return out


async def keys(d: Dashboard, req: Request, s: Session, form: dict[str, str] | None) -> Reply:
    if not s.is_admin:
        raise Problem(403, "Only an admin can see and manage keys")
    created: dict[str, Any] | None = None
    failure, code = "", 200
    if form is not None and form.get("action") == "revoke":
        status, body = await d.admin.call("DELETE", f"/admin/keys/{form.get('key_id', '')}")
        if status == 200:
            return redirect(f"/ui/keys?revoked={body['key_id']}")
        failure, code = body.get("error", f"HTTP {status}"), status
    elif form is not None:
        try:
            tags = _tags(form.get("tags", ""))
            if form.get("viewer"):
                if not form.get("team", "").strip():
                    raise ValueError("a team viewer key needs a team")
                tags["role"] = "viewer"
            spec: dict[str, Any] = {k: form.get(k, "").strip() for k in ("name", "org", "team", "user", "app", "env")}
            spec["models"] = [m.strip() for m in form.get("models", "").split(",") if m.strip()]
            spec["tags"] = tags
        except ValueError as e:
            failure, code = str(e), 400
        else:
            status, body = await d.admin.call("POST", "/admin/keys", spec)
            if status == 201:
                created, code = body, 201
            else:
                failure, code = body.get("error", f"HTTP {status}"), status
    status, listing = await d.admin.call("GET", "/admin/keys")
    if status != 200:
        raise Problem(503, f"Keys are unavailable: {listing.get('error')}")
    rows = sorted(listing["data"], key=lambda k: (not k["active"], k["team"], k["created_at"]))
    return d.html(req, "keys.html", _ctx(d, req, s, "keys", None, keys=rows, created=created, failure=failure,
                                         form=form or {}, revoked=req.query.get("revoked", ""),
                                         models=[m.name for m in d.host.cfg.models]), status=code)


FORM_PAGES = {"/ui/budgets", "/ui/keys"}
PAGES = {"/ui/overview": overview, "/ui/api/overview": api_overview, "/ui/api/status": api_status,
         "/ui/spend": spend, "/ui/spend.csv": spend_csv, "/ui/budgets": budgets, "/ui/outcomes": outcomes,
         "/ui/routing": routing, "/ui/run": run_page, "/ui/keys": keys, "/ui/audit": admin_pages.audit,
         "/ui/pools": admin_pages.pools}
