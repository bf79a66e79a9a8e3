"""The dashboard in a real browser: Playwright driving Debian's chromium (never a downloaded one)
against a real gateway + mock upstream, whose SQLite ledger holds 45 days of synthetic history and
live traffic sent by scripts/ui_traffic.py through the openai SDK.

Screenshots of every page go to the test's tmp dir; with MARGIN_UI_SHOTS=docs/img they are also
copied there as ui_<page>.png (see docs/dashboard.md)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest

from tests.conftest import IN_CI, PY, Gateway, free_port, gateway_config, read_events, start_gateway, start_mock, stop

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# Strings only other teams' data contains: a viewer of "support" must never see them.
OTHER_TEAMS = ("ana.lima", "ben.okafor", "dan.ruiz", "campaigns", "growth-monthly", "search-monthly")
OTHER_TEAM_WORDS = re.compile(r"\b(growth|legal|research)\b", re.IGNORECASE)


@dataclass
class UI:
    gw: Gateway
    keys: dict[str, dict[str, str]]
    shots: Path
    history_start: datetime


def history(ledger_url: str, end: datetime) -> datetime:
    """45 days of synthetic events (5 teams, runs with outcomes) ending before this month, so the
    month's budgets start clean whatever the date."""
    from margin.analytics import synthetic

    start = end - timedelta(days=45)
    synthetic.main([ledger_url, "--events", "15000", "--start", start.date().isoformat(), "--days", "45",
                    "--seed", "3"])
    return start


@pytest.fixture(scope="module")
def ui(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UI]:
    if not Path(CHROMIUM).exists():
        msg = f"{CHROMIUM} is missing: apt-get install -y chromium"
        pytest.fail(msg) if IN_CI else pytest.skip(msg)
    tmp = tmp_path_factory.mktemp("ui")
    ledger = f"sqlite:///{tmp}/ledger.db"
    month0 = datetime.now(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    start = history(ledger, month0)
    mock = start_mock(free_port(), output_tokens=12, seed=7)
    cfg = gateway_config(tmp, mock.url, ledger)
    cfg["providers"].append({"name": "down", "kind": "openai", "base_url": f"http://127.0.0.1:{free_port()}/v1",
                             "timeout_s": 2, "connect_timeout_s": 0.5})
    cfg["models"].append({"name": "flaky", "provider": "down", "price": {"genai_prices": "openai/gpt-4o-mini"},
                          "fallbacks": ["gpt-4o-mini"]})
    cfg.update({
        "groups": [{"name": "auto", "candidates": ["gpt-4o-mini", "gpt-4o"], "strategy": "cheapest",
                    "reference": "gpt-4o"}],
        "cache": {"enabled": True},
        "circuit_breaker": {"failures": 3, "cooldown_s": 600},
        "run_caps": [{"id": "refunds-cap", "scope": {"workflow": "refunds"}, "max_calls": 5}],
        "workflows": [{"name": "triage", "outcome": "resolved ticket",
                       "baseline": {"cost_per_outcome_usd": "3.20", "label": "human L1 agent"}}],
    })
    gw = start_gateway(tmp, cfg)
    try:
        r = subprocess.run([PY, str(ROOT / "scripts" / "ui_traffic.py"), "--base-url", gw.url, "--admin-key",
                            gw.admin_key, "--json"], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        out = orjson.loads(r.stdout)
        assert out["sent"]["refused 429"] >= 2, out["sent"]  # the growth budget blocked, the run cap stopped
        shots = tmp / "screenshots"
        shots.mkdir()
        yield UI(gw, out["keys"], shots, start)
    finally:
        assert gw.proc is not None
        stop(gw.proc)
        stop(mock.proc)
        target = os.environ.get("MARGIN_UI_SHOTS")
        if target and (tmp / "screenshots").exists():
            Path(target).mkdir(parents=True, exist_ok=True)
            for p in (tmp / "screenshots").glob("ui_*.png"):
                shutil.copy(p, Path(target) / p.name)


@pytest.fixture(scope="module")
def browser(ui: UI) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


class Session:
    """A browser context signed in with a key, collecting console errors and failed requests."""

    def __init__(self, browser: Any, ui: UI, key: str):
        self.ui = ui
        self.ctx = browser.new_context(viewport={"width": 1440, "height": 900})
        self.page = self.ctx.new_page()
        self.errors: list[str] = []
        self.page.on("console", lambda m: self.errors.append(f"console {m.type}: {m.text}")
                     if m.type in ("error", "warning") else None)
        self.page.on("pageerror", lambda e: self.errors.append(f"page error: {e}"))
        self.page.on("requestfailed", lambda r: self.errors.append(f"request failed: {r.url}"))
        self.page.goto(ui.gw.url + "/ui/overview")
        assert "/ui/login" in self.page.url
        self.page.fill("input[name=key]", key)
        self.page.click("button[type=submit]")
        self.page.wait_for_url("**/ui/overview")
        deadline = time.monotonic() + 120  # the dashboard's first copy of the ledger runs in the background
        while not self.ctx.request.get(ui.gw.url + "/ui/api/status").json()["synced"]:
            assert time.monotonic() < deadline, "the dashboard never caught up with the ledger"
            time.sleep(0.5)

    def open(self, path: str) -> Any:
        self.page.goto(self.ui.gw.url + path)
        self.page.wait_for_load_state("networkidle")
        return self.page

    def points(self) -> dict[str, int]:
        pts = self.page.eval_on_selector_all("canvas[data-chart]", "cs => cs.map(c => [c.id, c.dataset.points])")
        return {k: int(v) for k, v in pts}

    def shot(self, name: str) -> None:
        self.page.screenshot(path=str(self.ui.shots / f"ui_{name}.png"), full_page=True)

    def close(self) -> None:
        self.ctx.close()


PAGES = {  # page -> charts that must have data points
    "overview": ("chart-spend", "chart-levers"),
    "spend": ("chart-spend",),
    "budgets": ("chart-burn-growth-monthly", "chart-burn-search-monthly", "chart-burn-support-daily"),
    "outcomes": ("chart-outcome-trend", "chart-multiplier"),
    "routing": ("chart-mix",),
    "keys": (),
}


def test_every_page_renders_with_data_and_no_console_errors(browser: Any, ui: UI) -> None:
    s = Session(browser, ui, ui.gw.admin_key)
    try:
        for name, charts in PAGES.items():
            page = s.open(f"/ui/{name}")
            assert page.locator("h1").first.is_visible()
            assert "Loading the ledger" not in page.content()
            pts = s.points()
            for c in charts:
                assert pts.get(c, 0) > 0, (name, c, pts)
            s.shot(name)
        page = s.open("/ui/spend?period=90d&by=team")
        assert s.points()["chart-spend"] > 30  # daily buckets of the synthetic history
        s.shot("spend_by_team")
        # one agent run's steps, including the calls its cap refused
        page = s.open("/ui/run?id=refunds-001")
        assert "run_limit_exceeded" in page.content() and "refunds-cap" in page.content()
        s.shot("run")
        routing = s.open("/ui/routing").content()
        assert "refunds-001" in routing and re.search(r'class="state open">open<', routing)  # provider "down"
        budgets = s.open("/ui/budgets").content()
        assert "downgrade" in budgets and re.search(r"\d+ calls?", budgets)  # the growth budget's actions
        assert s.errors == [], s.errors
    finally:
        s.close()


def test_overview_refreshes_live(browser: Any, ui: UI) -> None:
    s = Session(browser, ui, ui.gw.admin_key)
    try:
        page = s.open("/ui/overview")
        before = page.inner_text('[data-field="requests"]')
        c = openai.OpenAI(base_url=ui.gw.base_url, api_key=ui.keys["carla.diaz"]["key"], max_retries=0)
        for i in range(3):
            c.chat.completions.create(model="gpt-4o-mini", max_tokens=8, messages=[{"role": "user", "content": f"{i}"}])
        after = before
        deadline = time.monotonic() + 20  # figures may lag the ledger by up to MARGIN_UI_MAX_STALE_S (5 s)
        while after == before and time.monotonic() < deadline:
            page.click(".live")  # the same fetch the 10 s timer makes
            page.wait_for_timeout(1000)
            after = page.inner_text('[data-field="requests"]')
        assert int(after.replace(",", "")) >= int(before.replace(",", "")) + 3
        assert "updated" in page.inner_text("[data-updated]")
        assert s.errors == [], s.errors
    finally:
        s.close()


def _edit_budget(page: Any, budget: str, limit: str) -> None:
    card = page.locator(f"#budget-{budget}")
    card.locator("details.edit summary").click()
    card.locator("input[name=limit]").fill(limit)
    card.locator("details.edit button.primary").click()
    page.wait_for_load_state("networkidle")
    assert f"Saved budget {budget}" in page.inner_text(".banner.ok")


def test_budget_edit_takes_effect_on_the_next_request(browser: Any, ui: UI) -> None:
    c = openai.OpenAI(base_url=ui.gw.base_url, api_key=ui.keys["ana.lima"]["key"], max_retries=0)

    def ask() -> int:
        try:
            c.chat.completions.create(model="gpt-4o-mini", max_tokens=8, messages=[{"role": "user", "content": "hi"}])
        except openai.APIStatusError as e:
            assert e.code == "budget_exceeded", e
            return e.status_code
        return 200

    s = Session(browser, ui, ui.gw.admin_key)
    try:
        assert ask() == 200
        page = s.open("/ui/budgets")
        _edit_budget(page, "search-monthly", "0.000001")
        assert "$0.000001" in page.locator("#budget-search-monthly").inner_text()
        assert ask() == 429  # the very next request, no wait
        _edit_budget(page, "search-monthly", "5")
        assert ask() == 200
        assert s.errors == [], s.errors
        # a bad edit is refused (HTTP 400) with the admin API's precise reason, and nothing changes
        card = page.locator("#budget-search-monthly")
        card.locator("details.edit summary").click()
        card.locator("textarea[name=thresholds]").fill("80:downgrade:gpt-4o=no-such-model")
        card.locator("details.edit button.primary").click()
        page.wait_for_load_state("networkidle")
        assert "Downgrade map names unknown model(s): no-such-model" in page.inner_text(".banner.warn")
        assert ask() == 200
    finally:
        s.close()


def test_keys_are_created_and_revoked_from_the_page(browser: Any, ui: UI) -> None:
    s = Session(browser, ui, ui.gw.admin_key)
    try:
        page = s.open("/ui/keys")
        page.locator("details summary").first.click()
        page.fill("form.grid-form input[name=name]", "ui-made")
        page.fill("form.grid-form input[name=team]", "support")
        page.fill("form.grid-form input[name=models]", "gpt-4o-mini")
        page.click("form.grid-form button.primary")
        page.wait_for_load_state("networkidle")
        secret = page.inner_text("[data-secret]").strip()
        assert secret.startswith("mk-")
        c = openai.OpenAI(base_url=ui.gw.base_url, api_key=secret, max_retries=0)
        assert [m.id for m in c.models.list().data if m.id != "auto"] == ["gpt-4o-mini"]
        s.open("/ui/keys")
        page.on("dialog", lambda d: d.accept())
        row = page.locator("tr", has_text="ui-made")
        row.locator("button.danger").click()
        page.wait_for_load_state("networkidle")
        assert "Revoked" in page.inner_text(".banner.ok")
        with pytest.raises(openai.AuthenticationError, match="revoked"):
            c.models.list()
        assert s.errors == [], s.errors
    finally:
        s.close()


def _support_ledger_total(ui: UI, since: datetime, until: datetime) -> Decimal:
    total = Decimal(0)
    for r in read_events(ui.gw.ledger_url):
        t = datetime.fromisoformat(r["ts_start"])
        if r["team"] == "support" and since <= t < until:
            total += Decimal(str(r["cost_usd"]))
    return total


def test_a_team_viewer_sees_only_its_team(browser: Any, ui: UI) -> None:
    other_run = next(r["run_id"] for r in read_events(ui.gw.ledger_url) if r["run_id"] and r["team"] == "legal")
    s = Session(browser, ui, ui.keys["support-viewer"]["key"])
    try:
        assert "viewer of team support" in s.page.inner_text(".badge")
        s.shot("viewer_overview")
        frm = ui.history_start.date().isoformat()
        to = datetime.now(UTC).date().isoformat()
        custom = f"period=custom&from={frm}&to={to}"
        pages = ["/ui/overview", "/ui/spend", "/ui/spend?by=team", "/ui/spend?by=user&top=user",
                 "/ui/spend?by=tag:feature&top=tag:feature", "/ui/spend?by=app&top=app", "/ui/spend?team=growth",
                 f"/ui/spend?{custom}&by=team", "/ui/budgets", "/ui/outcomes", f"/ui/outcomes?{custom}",
                 "/ui/routing", f"/ui/routing?{custom}", "/ui/run?id=triage-001"]
        for path in pages:
            text = s.open(path).content()
            for marker in OTHER_TEAMS:
                assert marker not in text, (path, marker)
            assert not OTHER_TEAM_WORDS.search(text), (path, OTHER_TEAM_WORDS.search(text))
            for canvas in s.page.eval_on_selector_all("canvas[data-chart]", "cs => cs.map(c => c.dataset.chart)"):
                assert not any(m in canvas for m in OTHER_TEAMS), (path, canvas[:200])
        assert "Edit limit" not in s.open("/ui/budgets").content()  # no edit forms for a viewer
        assert s.errors == [], s.errors
        # another team's run does not exist for this viewer
        s.open("/ui/run?id=" + other_run)
        assert "No calls of run" in s.page.content()
        # API and CSV, with the browser's session cookie
        for path in ("/ui/api/overview", "/ui/spend.csv?by=team", "/ui/spend.csv?by=user", f"/ui/spend.csv?{custom}"
                     "&by=team&bucket=week", "/ui/spend.csv?by=team&team=growth"):
            r = s.ctx.request.get(ui.gw.url + path)
            assert r.status == 200, (path, r.status)
            assert not any(m in r.text() for m in OTHER_TEAMS) and not OTHER_TEAM_WORDS.search(r.text()), path
        since = datetime.fromisoformat(frm).replace(tzinfo=UTC)
        until = datetime.fromisoformat(to).replace(tzinfo=UTC) + timedelta(days=1)
        want = _support_ledger_total(ui, since, until)
        deadline = time.monotonic() + 20  # the dashboard may lag the ledger by a few seconds
        while True:
            csv_text = s.ctx.request.get(ui.gw.url + f"/ui/spend.csv?{custom}&by=team&bucket=day").text()
            rows = [line.split(",") for line in csv_text.strip().splitlines()[1:]]
            assert {r[1] for r in rows} == {"support"}
            got = sum(Decimal(r[8]) for r in rows)
            if got == want or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert got == want  # exact, to the digit
        # admin-only pages and actions are refused
        assert s.open("/ui/keys").locator("h1").inner_text() == "Not allowed"
        csrf = s.open("/ui/budgets").locator("input[name=csrf]").first.get_attribute("value")
        r = s.ctx.request.post(ui.gw.url + "/ui/budgets", form={"csrf": csrf, "mode": "edit", "id": "support-daily",
                                                                 "limit": "1000"})
        assert r.status == 403 and "Only an admin" in r.text()
    finally:
        s.close()


def test_viewer_session_ends_when_its_key_is_revoked(browser: Any, ui: UI) -> None:
    key = httpx.post(ui.gw.url + "/admin/keys", headers={"Authorization": f"Bearer {ui.gw.admin_key}"},
                     json={"team": "support", "name": "temp viewer", "tags": {"role": "viewer"}}).json()
    s = Session(browser, ui, key["key"])
    try:
        assert s.open("/ui/spend").locator("h1").inner_text().startswith("Spend")
        httpx.delete(ui.gw.url + f"/admin/keys/{key['key_id']}", headers={"Authorization": f"Bearer {ui.gw.admin_key}"})
        s.open("/ui/spend")
        assert "/ui/login" in s.page.url
    finally:
        s.close()


def test_audit_log_page(browser: Any, ui: UI) -> None:
    """Admins read the audit log (filters, paging, each record's change) under the chain's verdict;
    a team viewer is refused."""
    httpx.post(ui.gw.url + "/admin/keys", headers={"Authorization": f"Bearer {ui.gw.admin_key}"},
               json={"team": "support", "name": "audited from the browser test"}).raise_for_status()
    s = Session(browser, ui, ui.gw.admin_key)
    try:
        page = s.open("/ui/audit")
        assert page.locator("nav a", has_text="Audit log").count() == 1
        assert "Chain verified" in page.inner_text("[data-verdict=ok]")
        rows = page.locator("tr[data-seq]")
        assert rows.count() >= 5  # the configuration at start, keys and budgets ui_traffic made, this key
        seqs = [int(x) for x in page.eval_on_selector_all("tr[data-seq]", "rs => rs.map(r => r.dataset.seq)")]
        assert seqs == sorted(seqs, reverse=True)  # newest first
        assert "audited from the browser test" in rows.first.inner_text()
        rows.first.locator("details summary").click()
        assert '"name": "audited from the browser test"' in rows.first.locator("pre.json").inner_text()
        page = s.open("/ui/audit?limit=8")  # the screenshot: one page of 8, the newest record opened
        page.locator("tr[data-seq]").first.locator("details summary").click()
        s.shot("audit")
        page.fill("input[name=action]", "budget.*")
        page.click("form.picker button[type=submit]")
        page.wait_for_load_state("networkidle")
        chips = page.eval_on_selector_all("tr[data-seq] .chip", "cs => cs.map(c => c.textContent)")
        assert chips and all(c.startswith("budget.") for c in chips), chips
        page = s.open("/ui/audit?limit=2")
        page.click("[data-older]")
        page.wait_for_load_state("networkidle")
        older = [int(x) for x in page.eval_on_selector_all("tr[data-seq]", "rs => rs.map(r => r.dataset.seq)")]
        assert older and max(older) < min(seqs[:2])
        assert s.errors == [], s.errors
    finally:
        s.close()
    v = Session(browser, ui, ui.keys["support-viewer"]["key"])
    try:
        assert v.page.locator("nav a", has_text="Audit log").count() == 0
        assert v.open("/ui/audit").locator("h1").inner_text() == "Not allowed"
    finally:
        v.close()


def test_audit_page_flags_a_tampered_chain(browser: Any, ui: UI) -> None:
    """Last in this module: it breaks the gateway's audit chain on purpose, as someone who can drop
    the append-only trigger would."""
    import sqlite3

    conn = sqlite3.connect(ui.gw.ledger_url.removeprefix("sqlite:///"))
    try:
        conn.execute("DROP TRIGGER audit_log_no_update")
        conn.execute("UPDATE audit_log SET actor = 'nobody' WHERE seq = 2")
        conn.commit()
    finally:
        conn.close()
    s = Session(browser, ui, ui.gw.admin_key)
    try:
        verdict = s.open("/ui/audit").inner_text("[data-verdict=broken]")
        assert "Chain broken at record #2" in verdict and "do not match its hash" in verdict
    finally:
        s.close()
