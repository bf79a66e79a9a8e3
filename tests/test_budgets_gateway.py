"""Budgets through the running gateway: thresholds, exact limits under concurrency, rate limits,
live administration, recovery after a restart. In-process state here; Redis in test_budgets_redis."""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
import threading
from collections.abc import Iterator
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.conftest import Gateway, Mock, gateway_config, start_gateway, stop

PREMIUM = {"name": "premium", "provider": "mock", "upstream_model": "gpt-4o",
           "price": {"per_million": {"input": "5", "output": "40"}}}


class Webhook:
    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        outer = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                outer.received.append(orjson.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *a: object) -> None:
                pass

        self.server = HTTPServer(("127.0.0.1", 0), H)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    w = Webhook()
    yield w
    w.server.shutdown()


def gateway_with(tmp: Path, mock: Mock, **extra: Any) -> Gateway:
    cfg = gateway_config(tmp, mock.url, f"sqlite:///{tmp}/ledger.db", **extra)
    cfg["models"].append(PREMIUM)
    return start_gateway(tmp, cfg)


def chat(gw: Gateway, key: str, model: str = "gpt-4o", max_tokens: int | None = 12, **headers: str) -> httpx.Response:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "one two three four five"}]}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return httpx.post(gw.base_url + "/chat/completions", json=body, timeout=30,
                      headers={"Authorization": f"Bearer {key}", **headers})


def test_department_downgrades_at_80_notifies_and_blocks_at_100(mock_upstream: Mock, tmp_path: Path,
                                                                webhook: Webhook) -> None:
    budget = {"id": "research-monthly", "name": "Research", "scope": {"team": "research"}, "limit_usd": "0.003",
              "period": "month", "timezone": "Europe/Paris", "webhook": webhook.url,
              "thresholds": [{"at": 50, "action": "notify"},
                             {"at": 80, "action": "downgrade", "map": {"gpt-4o": "gpt-4o-mini"}},
                             {"at": 100, "action": "block"}]}
    gw = gateway_with(tmp_path, mock_upstream, budgets=[budget])
    try:
        k = gw.create_key(team="research")
        other = gw.create_key(team="sales")
        statuses, served, downgraded_header = [], [], []
        for _ in range(400):
            r = chat(gw, k["key"])
            statuses.append(r.status_code)
            if r.status_code != 200:
                break
            served.append(r.headers["x-margin-route"].split()[0])
            downgraded_header.append(r.headers.get("x-margin-downgraded-from"))
        assert statuses[-1] == 429
        err = r.json()["error"]
        assert err["code"] == "budget_exceeded" and err["type"] == "budget_error"
        for fragment in ("Research", "spent", "of 0.003 USD", "resets 20"):
            assert fragment in err["message"], fragment
        assert int(r.headers["retry-after"]) > 0
        # gpt-4o until 80%, then the light model, with the header saying so
        assert served[0] == "gpt-4o" and served[-1] == "gpt-4o-mini"
        assert "gpt-4o" in downgraded_header
        # Another team is not affected.
        assert chat(gw, other["key"]).status_code == 200
        rows = gw.events(k["key_id"], expect=len(statuses))
        spent = sum(Decimal(x["cost_usd"]) for x in rows)
        assert spent <= Decimal("0.003")
        down = [x for x in rows if x["model"] == "gpt-4o-mini"]
        assert down and all(x["requested_model"] == "gpt-4o" for x in down)
        assert all(x["route_reason"] == "budget downgrade from gpt-4o" for x in down)
        assert any(a["action"] == "downgrade" for x in down for a in orjson.loads(x["actions"]))
        blocked = [x for x in rows if x["status"] == 429]
        assert blocked and blocked[0]["error_type"] == "budget_exceeded"
        metrics = httpx.get(gw.url + "/metrics").text
        for action in ("notify", "downgrade", "block"):
            assert f'margin_budget_actions_total{{action="{action}",budget="research-monthly"}}' in metrics, action
        # The 50% notification arrived once, at a real HTTP listener.
        assert len(webhook.received) == 1
        note = webhook.received[0]
        assert note["budget"] == "research-monthly" and note["threshold_pct"] == 50 and note["used_pct"] >= 50
        status = httpx.get(gw.url + "/admin/budgets/research-monthly",
                           headers={"Authorization": f"Bearer {gw.admin_key}"}).json()
        [counter] = status["counters"]
        assert Decimal(counter["spent"]) == spent and Decimal(counter["reserved"]) == 0
        assert status["period_start"].startswith("2026-") and "+01:00" in status["period_start"]
    finally:
        assert gw.proc is not None
        stop(gw.proc)


def run_burst(gw: Gateway, key: str, n: int, seed: int, model: str = "premium") -> list[httpx.Response]:
    rng = random.Random(seed)
    sizes = [rng.randint(1, 200) for _ in range(n)]

    async def go() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=n)
        async with httpx.AsyncClient(timeout=60, limits=limits) as c:
            return list(await asyncio.gather(*(
                c.post(gw.base_url + "/chat/completions", headers={"Authorization": f"Bearer {key}",
                                                                   "X-Mock-Output-Tokens": "200"},
                       json={"model": model, "max_tokens": s,
                             "messages": [{"role": "user", "content": "word " * rng.randint(1, 50)}]})
                for s in sizes)))

    return asyncio.run(go())


def test_500_concurrent_requests_cannot_overshoot_one_dollar(mock_upstream: Mock, tmp_path: Path) -> None:
    budget = {"id": "dollar", "limit_usd": "1.00", "scope": {"team": "burst"}, "period": "day"}
    gw = gateway_with(tmp_path, mock_upstream, budgets=[budget])
    try:
        k = gw.create_key(team="burst")
        responses = run_burst(gw, k["key"], 500, seed=11)
        codes = [r.status_code for r in responses]
        assert set(codes) <= {200, 429} and codes.count(200) > 50 and codes.count(429) > 0
        assert all(r.json()["error"]["code"] == "budget_exceeded" for r in responses if r.status_code == 429)
        rows = gw.events(k["key_id"], expect=500, timeout=30)
        assert len(rows) == 500
        settled = sum(Decimal(r["cost_usd"]) for r in rows)
        assert Decimal("0.5") < settled <= Decimal("1.00")
    finally:
        assert gw.proc is not None
        stop(gw.proc)


def test_cap_from_remaining_budget_when_client_gives_no_max_tokens(mock_upstream: Mock, tmp_path: Path) -> None:
    # $0.002: the prompt's worst case (~130 tokens at $5/MTok) leaves room for ~30 output tokens at $40/MTok.
    gw = gateway_with(tmp_path, mock_upstream, budgets=[{"id": "tiny", "limit_usd": "0.002", "scope": {"team": "t"}}])
    try:
        k = gw.create_key(team="t")
        r = chat(gw, k["key"], model="premium", max_tokens=None, **{"X-Mock-Output-Tokens": "1000"})
        assert r.status_code == 200, r.text
        [row] = gw.events(k["key_id"], expect=1)
        assert Decimal(row["cost_usd"]) <= Decimal("0.002")
        assert 0 < row["output_tokens"] < 60  # margin capped the output at what the budget affords
    finally:
        assert gw.proc is not None
        stop(gw.proc)


def test_rate_limit_per_key(mock_upstream: Mock, tmp_path: Path) -> None:
    gw = gateway_with(tmp_path, mock_upstream, rate_limits=[{"id": "per-key", "scope": {"key": "*"}, "rpm": 5}])
    try:
        a, b = gw.create_key(team="x"), gw.create_key(team="x")
        codes = [chat(gw, a["key"]).status_code for _ in range(7)]
        assert codes[:5] == [200] * 5 and codes[5:] == [429, 429]
        r = chat(gw, a["key"])
        assert r.json()["error"]["code"] == "rate_limit_exceeded" and r.json()["error"]["type"] == "rate_limit_error"
        assert int(r.headers["retry-after"]) >= 1
        assert chat(gw, b["key"]).status_code == 200  # another key has its own bucket
    finally:
        assert gw.proc is not None
        stop(gw.proc)


def test_live_admin_and_restart_recovery(mock_upstream: Mock, tmp_path: Path) -> None:
    gw = gateway_with(tmp_path, mock_upstream)
    admin = {"Authorization": f"Bearer {gw.admin_key}"}
    try:
        k = gw.create_key(team="ops")
        assert chat(gw, k["key"]).status_code == 200  # no budget yet
        r = httpx.put(gw.url + "/admin/budgets/ops", headers=admin,
                      json={"id": "ops", "scope": {"team": "ops"}, "limit_usd": "0.0004", "period": "day"})
        assert r.status_code == 200, r.text
        codes = [chat(gw, k["key"]).status_code for _ in range(6)]
        assert 429 in codes  # effective on the next requests
        bad = httpx.put(gw.url + "/admin/budgets/x", headers=admin, json={"id": "x", "limit_usd": -1})
        assert bad.status_code == 400 and "limit_usd" in bad.json()["error"]["message"]
        listed = httpx.get(gw.url + "/admin/budgets", headers=admin).json()["data"]
        assert [b["id"] for b in listed] == ["ops"] and listed[0]["source"] == "admin"
        # The CLI drives the same API.
        cli = [sys.executable, "-m", "margin", "budgets"]
        common = ["--config", str(gw.config), "--url", gw.url]
        r2 = subprocess.run([*cli, "set", "--id", "ops-weekly", "--scope", "team=ops", "--limit-usd", "5",
                             "--period", "week", "--threshold", "80:downgrade:gpt-4o=gpt-4o-mini",
                             "--threshold", "100:block", *common, "--json"], capture_output=True, text=True)
        assert r2.returncode == 0, r2.stderr
        assert orjson.loads(r2.stdout)["thresholds"][0]["map"] == {"gpt-4o": "gpt-4o-mini"}
        out = subprocess.run([*cli, "status", "ops", *common], capture_output=True, text=True)
        assert out.returncode == 0 and "ops" in out.stdout and "0.0004 USD" in out.stdout
        missing = subprocess.run([*cli, "status", "nope", *common], capture_output=True, text=True)
        assert missing.returncode == 2 and "No budget with id nope" in missing.stderr
        httpx.delete(gw.url + "/admin/budgets/ops-weekly", headers=admin)
    finally:
        assert gw.proc is not None
        stop(gw.proc)
    # Restart: the in-process counters are rebuilt from the ledger, so the budget still holds.
    gw2 = start_gateway(tmp_path, orjson.loads(orjson.dumps(__import__("yaml").safe_load(gw.config.read_text()))))
    try:
        status = httpx.get(gw2.url + "/admin/budgets/ops", headers=admin).json()
        assert Decimal(status["counters"][0]["spent"]) > 0
        assert chat(gw2, k["key"]).status_code == 429
        assert httpx.delete(gw2.url + "/admin/budgets/ops", headers=admin).json() == {"id": "ops", "deleted": True}
        assert chat(gw2, k["key"]).status_code == 200
    finally:
        assert gw2.proc is not None
        stop(gw2.proc)
