"""Dashboard access: signed sessions, CSRF, roles, and the team restriction in the SQL of every
query a viewer's page runs. HTTP tests run against the real gateway (SQLite and PostgreSQL ledgers);
the SQL test records what a real DuckDB warehouse over a real SQLite ledger executes."""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from margin.analytics import actions as act
from margin.analytics import synthetic
from margin.analytics.filters import Filter
from margin.analytics.warehouse import Warehouse
from margin.domain import VirtualKey
from margin.ui import budgets as bud
from margin.ui import data, fmt
from margin.ui.params import buckets, parse_view
from margin.ui.session import Session, Signer, SignInThrottle, sign_in
from tests.conftest import Gateway, Mock, gateway_config, start_gateway, stop

ADMIN = "test-admin-key"
NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)


# -- sessions, pure --------------------------------------------------------------------------------

def test_signed_tokens_reject_tampering_expiry_and_the_wrong_purpose() -> None:
    s = Signer(b"k" * 32)
    tok = s.sign({"r": "admin", "exp": 2000})
    assert s.unsign(tok, now=1000) == {"r": "admin", "exp": 2000}
    assert s.unsign(tok, now=2000) is None  # expired
    body, mac = tok.split(".")
    forged = Signer(b"k" * 32).sign({"r": "admin", "exp": 9999}).split(".")[0] + "." + mac
    assert s.unsign(forged, now=1000) is None
    assert s.unsign(body + ".AAAA", now=1000) is None
    assert s.unsign("garbage", now=1000) is None
    assert Signer(b"x" * 32).unsign(tok, now=1000) is None  # another secret
    login = s.sign({"n": "abc", "exp": 2000}, purpose="login")
    assert s.unsign(login, now=1000) is None  # a sign-in form token is not a session
    assert s.csrf_ok("nonce", s.csrf("nonce")) and not s.csrf_ok("nonce", s.csrf("other"))
    assert not s.csrf_ok("nonce", None) and not s.csrf_ok("nonce", "")
    with pytest.raises(ValueError, match="16 bytes"):
        Signer(b"short")


def _key(team: str, tags: tuple[tuple[str, str], ...], revoked: bool = False) -> VirtualKey:
    now = datetime.now(UTC)
    return VirtualKey(key_id=f"key_{team}", key_hash="h", prefix="mk-x", created_at=now, team=team, tags=tags,
                      revoked_at=now if revoked else None)


async def test_sign_in_roles() -> None:
    keys = {"viewer": _key("support", (("role", "viewer"),)), "caller": _key("support", ()),
            "teamless": _key("", (("role", "viewer"),)), "revoked": _key("support", (("role", "viewer"),), True)}

    async def lookup(secret: str) -> VirtualKey | None:
        return keys.get(secret)

    s = Signer(b"k" * 32)
    admin = await sign_in(f"  {ADMIN} ", ADMIN, lookup, s, 1000.0)
    assert isinstance(admin, Session) and admin.is_admin and admin.admin_fp == s.fingerprint(ADMIN)
    viewer = await sign_in("viewer", ADMIN, lookup, s, 1000.0)
    assert isinstance(viewer, Session) and viewer.role == "viewer" and viewer.team == "support"
    assert "model-call key" in str(await sign_in("caller", ADMIN, lookup, s, 1000.0))
    assert "model-call key" in str(await sign_in("teamless", ADMIN, lookup, s, 1000.0))
    assert "not valid" in str(await sign_in("revoked", ADMIN, lookup, s, 1000.0))
    assert "not valid" in str(await sign_in("nope", ADMIN, lookup, s, 1000.0))
    assert "Paste" in str(await sign_in("", ADMIN, lookup, s, 1000.0))
    assert "not valid" in str(await sign_in(ADMIN, None, lookup, s, 1000.0))  # no admin key configured
    back = s.session(s.issue(viewer), 1001.0)
    assert back == viewer


# -- parameters, forms, formatting -------------------------------------------------------------------

def test_view_parameters_and_their_errors() -> None:
    v = parse_view({"period": "7d", "team": "search", "model": "gpt-4o"}, NOW, viewer=True)
    assert v.where == (("model", "gpt-4o"),)  # a viewer's team never comes from the URL
    assert v.bucket == "day" and v.until - v.since == timedelta(days=7)
    assert parse_view({}, NOW, "24h").bucket == "hour"
    c = parse_view({"period": "custom", "from": "2026-11-01", "to": "2026-11-03"}, NOW)
    assert (c.since, c.until) == (datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 11, 4, tzinfo=UTC))
    for q, msg in (({"period": "1y"}, "period '1y': choose one of"),
                   ({"period": "custom", "from": "2026-11-05", "to": "2026-11-01"}, "is before"),
                   ({"period": "custom", "from": "2026-13-01", "to": "2026-12-01"}, "not a real date"),
                   ({"period": "custom", "from": "yesterday", "to": "2026-12-01"}, "YYYY-MM-DD"),
                   ({"period": "90d", "bucket": "hour"}, "hourly buckets"),
                   ({"bucket": "minute"}, "bucket 'minute'")):
        with pytest.raises(ValueError, match=msg):
            parse_view(q, NOW)
    days = buckets(datetime(2026, 11, 1, 5, tzinfo=UTC), datetime(2026, 11, 4, 1, tzinfo=UTC), "day")
    assert [d.day for d in days] == [1, 2, 3, 4]


def test_budget_form_parsing() -> None:
    ts = bud.parse_thresholds("50:notify\n\n80:downgrade:gpt-4o=gpt-4o-mini, *-large=*-small\n90:defer:low\n100%:block")
    assert ts == [{"at": "50", "action": "notify"},
                  {"at": "80", "action": "downgrade", "map": {"gpt-4o": "gpt-4o-mini", "*-large": "*-small"}},
                  {"at": "90", "action": "defer", "priority": "low"}, {"at": "100", "action": "block"}]
    assert bud.parse_thresholds(bud.thresholds_text(ts)) == ts
    for text, msg in (("80", "use PCT:ACTION"), ("x:block", "not a percentage"), ("80:stop", "action must be one of"),
                      ("80:downgrade", "needs a map"), ("80:block:now", "takes no argument")):
        with pytest.raises(ValueError, match=msg):
            bud.parse_thresholds(text)
    current = {"id": "t", "scope": {"team": "a"}, "limit_tokens": 1000, "period": "day", "thresholds": []}
    assert bud.budget_body({"limit": "5000", "thresholds": ""}, current)["limit_tokens"] == 5000
    with pytest.raises(ValueError, match="counts tokens"):
        bud.budget_body({"limit": "5.5"}, current)
    new = bud.budget_body({"id": "n", "scope": "team=a, env=prod", "period": "rolling", "rolling": "24h",
                           "limit": "12.50", "thresholds": "100:block"}, None)
    assert new["scope"] == {"team": "a", "env": "prod"} and new["limit_usd"] == "12.50" and new["rolling"] == "24h"
    for form, msg in (({"limit": "1"}, "needs an id"), ({"id": "n", "scope": "team", "limit": "1"}, "dimension=value"),
                      ({"id": "n", "limit": "lots"}, "not an amount"), ({"id": "n"}, "limit is required")):
        with pytest.raises(ValueError, match=msg):
            bud.budget_body(form, None)


def test_money_display_keeps_small_amounts_readable() -> None:
    assert fmt.money("1234.5678") == "$1,234.57"
    assert fmt.money("0.0123456") == "$0.0123"
    assert fmt.money("0.000123456") == "$0.000123"
    assert fmt.money("0") == "$0.00" and fmt.money(None) == "-"
    assert fmt.money("0.0000000004") == "<$0.000001"
    assert fmt.exact("0.000123456") == "exact: 0.000123456 USD"
    assert fmt.ratio(43009.75) == "43,010×" and fmt.ratio(2.5) == "2.5×"
    assert fmt.actions('[{"action": "downgrade", "from": "gpt-4o", "to": "gpt-4o-mini", "budgets": ["b"]}, '
                       '{"action": "saved", "lever": "downgrade", "usd": "0.00012", "tokens": 0}]') == \
        "downgraded gpt-4o → gpt-4o-mini; saved $0.000120 (downgrade)"
    assert fmt.actions('[{"action": "run_stop", "cap": "c", "limit": "max_calls"}]') == "stopped by cap c (max_calls)"
    assert fmt.actions("[]") == "" and fmt.actions(None) == "" and fmt.actions("not json") == "not json"


def test_viewers_see_only_budgets_of_their_team() -> None:
    team_b = {"id": "a", "scope": {"team": "support"}, "counters": [], "fired": []}
    org_b = {"id": "b", "scope": {"org": "acme"}, "counters": [], "fired": []}
    per_team = {"id": "c", "scope": {"team": "*"}, "fired": [{"counter": "b:c:team=search:1"},
                                                            {"counter": "b:c:team=support:1"}],
                "counters": [{"scope": "team=search"}, {"scope": "team=support"}]}
    assert bud.visible(team_b, "support") == team_b and bud.visible(org_b, "support") is None
    mine = bud.visible(per_team, "support")
    assert mine is not None and mine["counters"] == [{"scope": "team=support"}]
    assert mine["fired"] == [{"counter": "b:c:team=support:1"}]
    assert bud.visible(org_b, None) == org_b  # an admin sees everything


# -- the team restriction is in the SQL --------------------------------------------------------------

class Recording(Warehouse):
    """A real DuckDB warehouse that also keeps the SQL it ran (instrumentation, not a stand-in)."""

    seen: list[tuple[str, list[Any]]]

    def query(self, sql: str, params: list[Any] | None = None) -> list[dict[str, Any]]:
        self.seen.append((sql, list(params or [])))
        return super().query(sql, params)


@pytest.fixture(scope="module")
def warehouse(tmp_path_factory: pytest.TempPathFactory) -> Recording:
    path = tmp_path_factory.mktemp("uiwh") / "ledger.db"
    synthetic.main([f"sqlite:///{path}", "--events", "4000", "--start", "2026-10-20", "--days", "30"])
    wh = Recording(f"sqlite:///{path}")
    wh.seen = []
    asyncio.run(wh.refresh())
    return wh


def test_every_query_of_a_viewers_pages_filters_by_team_in_sql(warehouse: Recording) -> None:
    wh = warehouse
    team = "support"
    f = Filter(since=NOW - timedelta(days=30), until=NOW, team=team)
    budget = {"id": "x", "limit_usd": "50", "scope": {"team": "*"}, "counters": [{"scope": "team=support",
                                                                                   "used_pct": 10}],
              "period_start": "2026-11-01T00:00:00+00:00", "period_end": "2026-12-01T00:00:00+00:00",
              "thresholds": [{"at": "80", "action": "notify"}]}
    short = {**budget, "period_start": "2026-11-20T00:00:00+00:00", "period_end": "2026-11-21T00:00:00+00:00"}
    run_id = wh.query("SELECT run_id FROM events WHERE team = 'support' AND run_id IS NOT NULL LIMIT 1")[0]["run_id"]
    wh.seen = []
    results = {
        "overview": data.overview(wh, f, NOW, "day"), "actions": act.budget_actions(wh, f, f.since),
        "spend": data.spend(wh, f, "team", "day", "user"), "spend_tag": data.spend(wh, f, "tag:feature", "day"),
        "csv": data.spend_csv(wh, f, "user", "day"), "outcomes": data.outcomes(wh, f, "day", {}, {}),
        "routing": data.routing(wh, f), "run": data.run_detail(wh, run_id, f),
        "burn": bud.burn(wh, f, budget, NOW, bud.Forecasts()), "burn_hourly": bud.burn(wh, f, short, NOW,
                                                                                       bud.Forecasts()),
        "fired": bud.fired_actions(wh, f, [budget]),
    }
    assert len(wh.seen) >= 20
    for sql, params in wh.seen:  # every scan of a table with a team column carries the team condition
        scans = len(re.findall(r"\b(?:FROM|JOIN)\s+(?:events|savings|runs|hourly|budget_acts)\b", sql))
        assert scans >= 1, sql
        assert len(re.findall(r"\bteam = \?", sql)) >= scans, sql
        assert params.count(team) >= scans, (sql, params)
    # and what comes back is the team's only
    assert {r["key"] for r in results["spend"]["breakdown"]} == {"support"}
    assert results["spend"]["choices"]["team"] == ["support"]
    assert {r["team"] for r in results["routing"]["runs"]} == {"support"}
    assert results["run"]["steps"]
    other = wh.query("SELECT run_id FROM events WHERE team = 'legal' AND run_id IS NOT NULL LIMIT 1")[0]["run_id"]
    assert data.run_detail(wh, other, f)["steps"] == []
    total = wh.query("SELECT sum(cost_usd) AS s FROM events WHERE team = ? AND ts_start >= ? AND ts_start < ?",
                     [team, f.since.replace(tzinfo=None), NOW.replace(tzinfo=None)])[0]["s"]  # type: ignore[union-attr]
    assert Decimal(results["spend"]["total_usd"]) == total


# -- over HTTP, against the running gateway (SQLite and PostgreSQL ledgers) -------------------------

def _client(gw: Gateway) -> httpx.Client:
    return httpx.Client(base_url=gw.url, follow_redirects=False, timeout=30)


def _csrf(html: str) -> str:
    m = re.search(r'name="csrf" value="([^"]+)"', html)
    assert m, html[:500]
    return m.group(1)


def sign_in_http(gw: Gateway, key: str, next_: str = "") -> tuple[httpx.Client, httpx.Response]:
    c = _client(gw)
    page = c.get("/ui/login")
    r = c.post("/ui/login", data={"csrf": _csrf(page.text), "key": key, "next": next_})
    return c, r


def test_http_sign_in_cookies_and_redirects(gateway: Gateway) -> None:
    c = _client(gateway)
    r = c.get("/ui/spend?period=30d")
    assert r.status_code == 303 and r.headers["location"] == "/ui/login?next=%2Fui%2Fspend%3Fperiod%3D30d"
    r = c.get("/ui/api/overview")
    assert r.status_code == 401 and "Sign in first" in r.json()["error"]
    page = c.get("/ui/login")
    assert page.status_code == 200 and "default-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-frame-options"] == "DENY" and "total;dur=" in page.headers["server-timing"]
    # the sign-in form needs its token (login CSRF)
    r = c.post("/ui/login", data={"key": ADMIN})
    assert r.status_code == 403 and "sign-in form expired" in r.text
    r = c.post("/ui/login", data={"key": "mk-wrong", "csrf": _csrf(page.text)})
    assert r.status_code == 401 and "not valid" in r.text
    c2, r = sign_in_http(gateway, ADMIN, "/ui/spend?period=30d")
    assert r.status_code == 303 and r.headers["location"] == "/ui/spend?period=30d"
    cookie = next(h for h in r.headers.get_list("set-cookie") if h.startswith("margin_ui="))
    for flag in ("HttpOnly", "SameSite=Strict", "Path=/ui", "Max-Age="):
        assert flag in cookie
    assert c2.get("/ui/spend?period=30d").status_code == 200
    # no open redirect after sign-in
    for evil in ("//evil.example/x", "https://evil.example", "/ui\\..\\x", "/admin/keys"):
        _, r = sign_in_http(gateway, ADMIN, evil)
        assert r.headers["location"] == "/ui/overview", evil
    # a tampered cookie is no session
    token = c2.cookies["margin_ui"]
    c3 = _client(gateway)
    c3.cookies.set("margin_ui", token[:-3] + ("AAA" if not token.endswith("AAA") else "BBB"), path="/ui")
    assert c3.get("/ui/overview").status_code == 303


def test_sign_in_throttle_per_address() -> None:
    t = SignInThrottle(limit=3, window_s=60, max_clients=2)
    for i in range(3):
        assert t.retry_after("a", 100 + i) is None
        t.attempt("a", 100 + i)  # each fails
    assert t.retry_after("a", 103) == pytest.approx(57)  # until the first failure leaves the window
    assert t.retry_after("b", 103) is None  # another address is not held back
    assert t.retry_after("a", 160.5) is None  # the first failure left the window: one more try
    t.attempt("a", 160.6)
    assert t.retry_after("a", 160.7) == pytest.approx(0.3)  # counted while it is looked up
    t.succeeded("a", 160.6)  # it succeeded: only that attempt is taken back
    assert t.retry_after("a", 160.7) is None and len(t._fails["a"]) == 2
    for who in ("x", "y", "z"):  # bounded memory: the least recently failing address is dropped
        t.attempt(who, 200)
    assert set(t._fails) == {"y", "z"}


def test_http_sign_in_is_throttled_after_repeated_failures(gateway: Gateway) -> None:
    # From its own loopback address, so the other tests' sign-ins (from 127.0.0.1) are not held back.
    c = httpx.Client(base_url=gateway.url, follow_redirects=False, timeout=30,
                     transport=httpx.HTTPTransport(local_address="127.0.0.2"))
    for _ in range(10):
        page = c.get("/ui/login")
        assert c.post("/ui/login", data={"key": "mk-guess", "csrf": _csrf(page.text)}).status_code == 401
    page = c.get("/ui/login")
    r = c.post("/ui/login", data={"key": ADMIN, "csrf": _csrf(page.text)})  # even the right key waits now
    assert r.status_code == 429 and "Too many failed sign-ins" in r.text
    _, ok = sign_in_http(gateway, ADMIN)  # another address signs in as usual
    assert ok.status_code == 303
    # A viewer key does not wipe earlier failures: 9 guesses, a viewer sign-in, then the 10th guess
    # still locks the address (from a third loopback address, fresh).
    viewer = gateway.create_key(team="ops", name="v", tags={"role": "viewer"})
    c3 = httpx.Client(base_url=gateway.url, follow_redirects=False, timeout=30,
                      transport=httpx.HTTPTransport(local_address="127.0.0.3"))
    for key in ["mk-guess"] * 9 + [viewer["key"], "mk-guess"]:
        page = c3.get("/ui/login")
        c3.post("/ui/login", data={"key": key, "csrf": _csrf(page.text)})
    page = c3.get("/ui/login")
    assert c3.post("/ui/login", data={"key": ADMIN, "csrf": _csrf(page.text)}).status_code == 429


def test_sign_in_throttle_behind_a_trusted_proxy(mock_upstream: Mock, tmp_path: Path) -> None:
    """Behind a proxy the gateway trusts (--forwarded-allow-ips), a guesser is held back by its own
    X-Forwarded-For address, not the proxy's; a peer that is not a trusted proxy cannot claim one."""
    gw = start_gateway(tmp_path, gateway_config(tmp_path, mock_upstream.url, f"sqlite:///{tmp_path}/l.db"),
                       args=["--forwarded-allow-ips", "127.0.0.4"])

    def tries(peer: str, forwarded_for: str, keys: list[str]) -> list[int]:
        c = httpx.Client(base_url=gw.url, follow_redirects=False, timeout=30,
                         headers={"X-Forwarded-For": forwarded_for},
                         transport=httpx.HTTPTransport(local_address=peer))
        codes = []
        for key in keys:
            page = c.get("/ui/login")
            codes.append(c.post("/ui/login", data={"key": key, "csrf": _csrf(page.text)}).status_code)
        return codes

    try:
        admin = gw.admin_key
        assert tries("127.0.0.4", "203.0.113.7", ["mk-guess"] * 10 + [admin]) == [401] * 10 + [429]
        assert tries("127.0.0.4", "203.0.113.8", [admin]) == [303]  # another user through the same proxy
        # a direct peer's header is not believed: its guesses are its own, the user it names is not held back
        assert tries("127.0.0.2", "203.0.113.8", ["mk-guess"] * 10 + [admin]) == [401] * 10 + [429]
        assert tries("127.0.0.4", "203.0.113.8", [admin]) == [303]
    finally:
        assert gw.proc is not None
        stop(gw.proc)


def test_http_forms_need_csrf_and_same_origin(gateway: Gateway) -> None:
    c, _ = sign_in_http(gateway, ADMIN)
    page = c.get("/ui/keys")
    token = _csrf(page.text)
    r = c.post("/ui/keys", data={"name": "x", "team": "t"})
    assert r.status_code == 403 and "security token" in r.text
    r = c.post("/ui/keys", data={"name": "x", "team": "t", "csrf": token}, headers={"Origin": "https://evil.example"})
    assert r.status_code == 403 and "Cross-origin" in r.text
    r = c.post("/ui/keys", data={"name": "x", "team": "t", "csrf": token, "tags": "oops"})
    assert r.status_code == 400 and "tag &#39;oops&#39;: use name=value" in r.text
    r = c.post("/ui/keys", data={"name": "x", "csrf": token, "viewer": "1"})
    assert r.status_code == 400 and "needs a team" in r.text
    r = c.post("/ui/keys", data={"name": "x", "csrf": token, "models": "gpt-4o,nope"})
    assert r.status_code == 400 and "Unknown model(s): nope" in r.text
    r = c.post("/ui/keys", content=b'{"name": "x"}', headers={"content-type": "application/json"})
    assert r.status_code == 415
    r = c.get("/ui/spend?period=1y")
    assert r.status_code == 400 and "period &#39;1y&#39;" in r.text
    assert c.get("/ui/nowhere").status_code == 404
    static = c.get("/ui/static/chart.umd.min.js")
    assert static.status_code == 200 and static.headers["content-type"].startswith("text/javascript")
    assert c.get("/ui/static/../session.py").status_code == 404


def test_http_viewer_role_and_sign_out(gateway: Gateway, tmp_path: Path) -> None:
    caller = gateway.create_key(team="support", user="u")
    _, r = sign_in_http(gateway, caller["key"])
    assert r.status_code == 401 and "model-call key" in r.text
    viewer = gateway.create_key(team="support", name="v", tags={"role": "viewer"})
    c, r = sign_in_http(gateway, viewer["key"])
    assert r.status_code == 303
    for path in ("/ui/overview", "/ui/spend", "/ui/budgets", "/ui/outcomes", "/ui/routing"):
        assert c.get(path).status_code == 200, path
    assert c.get("/ui/keys").status_code == 403
    # the ledger (SQLite or PostgreSQL) reaches the dashboard: a call appears in the viewer's figures
    httpx.post(gateway.base_url + "/chat/completions", headers={"Authorization": f"Bearer {caller['key']}"},
               json={"model": "gpt-4o-mini", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
    gateway.events(caller["key_id"], expect=1)
    deadline = datetime.now(UTC) + timedelta(seconds=10)
    while True:
        body = c.get("/ui/api/overview").json()
        if body["fields"]["requests"] != "0" or datetime.now(UTC) > deadline:
            break
    assert int(body["fields"]["requests"]) >= 1
    # sign out: the cookie is cleared, and the old one no longer opens a session here
    page = c.get("/ui/overview")
    old = c.cookies["margin_ui"]
    r = c.post("/ui/logout", data={"csrf": _csrf(page.text)})
    assert r.status_code == 303 and "margin_ui=;" in r.headers["set-cookie"]
    c2 = _client(gateway)
    c2.cookies.set("margin_ui", old, path="/ui")
    assert c2.get("/ui/overview").status_code == 303


def test_http_sign_out_holds_on_every_replica(mock_upstream: Mock, tmp_path: Path) -> None:
    """Two replicas sharing Redis (and, through the admin key, the session secret): a session signed
    out on one is refused by the other, not only where the button was pressed."""
    from tests.test_budgets_redis import REDIS, cluster

    a, b = cluster(tmp_path, mock_upstream, 2, state=REDIS)
    try:
        c, r = sign_in_http(a, ADMIN)
        assert r.status_code == 303
        old = c.cookies["margin_ui"]
        other = _client(b)
        other.cookies.set("margin_ui", old, path="/ui")
        assert other.get("/ui/overview").status_code == 200  # one session, valid on both replicas
        page = c.get("/ui/overview")
        assert c.post("/ui/logout", data={"csrf": _csrf(page.text)}).status_code == 303
        assert other.get("/ui/overview").status_code == 303  # signed out on a: refused on b too
    finally:
        for gw in (a, b):
            assert gw.proc is not None
            stop(gw.proc)


# -- the audit log page (issue 11), admins only -------------------------------------------------------

def test_http_audit_page_lists_filters_pages_and_verifies(gateway: Gateway) -> None:
    key = gateway.create_key(team="audited", name="audit me")
    httpx.delete(gateway.url + f"/admin/keys/{key['key_id']}", headers={"Authorization": f"Bearer {ADMIN}"})
    c, _ = sign_in_http(gateway, ADMIN)
    page = c.get("/ui/audit")
    assert page.status_code == 200 and 'href="/ui/audit"' in page.text  # in the admin's navigation
    assert 'data-verdict="ok"' in page.text and "Chain verified" in page.text
    mine = c.get(f"/ui/audit?target={key['key_id']}").text
    assert re.findall(r'data-seq="(\d+)"', mine) and len(re.findall(r'data-seq="', mine)) == 2
    chip = '<span class="chip">{}</span>'.format
    assert chip("key.create") in mine and chip("key.revoke") in mine and "audit me" in mine
    assert "revoked_at: null →" in mine  # what the revocation changed, field by field
    assert len(re.findall(r'data-seq="', c.get(f"/ui/audit?target={key['key_id']}&action=key.revoke").text)) == 1
    assert len(re.findall(r'data-seq="', c.get(f"/ui/audit?target={key['key_id']}&action=key.*").text)) == 2
    # paging: one record a page, newest first, then the older one
    first = c.get(f"/ui/audit?target={key['key_id']}&limit=1").text
    older = re.search(r'href="([^"]+)" data-older', first)
    assert older and chip("key.revoke") in first and chip("key.create") not in first
    second = c.get(older.group(1).replace("&amp;", "&")).text
    assert chip("key.create") in second and chip("key.revoke") not in second and "Newest" in second
    for bad, msg in (("before_seq=x", "before_seq"), ("since=1y", "since &#39;1y&#39;"), ("limit=0", "limit")):
        r = c.get(f"/ui/audit?{bad}")
        assert r.status_code == 400 and msg in r.text, bad
    # a team viewer neither sees the page in its navigation nor opens it
    viewer = gateway.create_key(team="audited", name="v", tags={"role": "viewer"})
    v, _ = sign_in_http(gateway, viewer["key"])
    assert 'href="/ui/audit"' not in v.get("/ui/overview").text
    r = v.get("/ui/audit")
    assert r.status_code == 403 and "Only an admin can see the audit log" in r.text
    assert v.get("/ui/pools").status_code == 403
    # no pool in this gateway: the page says so and the navigation leaves it out
    assert 'href="/ui/pools"' not in page.text
    assert "No self-hosted pool is configured" in c.get("/ui/pools").text
