"""Forecasts: a 90-day synthetic history with weekly seasonality and trend is backtested (MAPE);
budgets' exhaustion dates; an injected spike fires the budget's webhook exactly once (a real local
HTTP server receives it)."""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import orjson
import pytest

from margin.analytics import forecast as fc
from margin.analytics.anomaly import check
from margin.analytics.synthetic import daily_spend, event_row
from margin.analytics.warehouse import Warehouse
from margin.domain.budget import Budget
from margin.ledger import open_store


def test_backtest_on_90_days_with_weekly_seasonality_and_trend() -> None:
    y = daily_spend(90, seed=0)
    r = fc.backtest(y, horizon=7, folds=4)
    assert r["days"] == 90 and r["folds"] == 4 and r["model"] == "ETS(M,A,M)"
    assert r["mape_pct"] is not None and r["mape_pct"] < 15
    assert r["mape_pct"] < r["seasonal_naive_mape_pct"]  # it learned the trend, not just the week
    assert r["interval_coverage"] >= 0.6
    with pytest.raises(ValueError, match="at least 21 days"):
        fc.backtest(y[:20])


def test_forecast_fallbacks_always_answer() -> None:
    start = date(2026, 11, 1)
    assert fc.forecast(np.zeros(30), start, 3).model in ("ETS(A,A,A)", "seasonal naive")
    short = fc.forecast([1.0, 2.0, 3.0], start, 2)
    assert short.model == "mean of last 7 days" and list(short.mean) == [2.0, 2.0]
    zeros = fc.forecast(np.r_[np.zeros(10), daily_spend(30)], start, 7)
    assert np.all(zeros.lower >= 0) and np.all(zeros.lower <= zeros.mean) and np.all(zeros.mean <= zeros.upper)


def test_exhaustion_date_follows_the_forecast() -> None:
    now = datetime(2026, 11, 10, 0, 30, tzinfo=UTC)
    end = datetime(2026, 12, 1, tzinfo=UTC)
    flat = [10.0] * 40
    r = fc.exhaustion(flat, Decimal(50), Decimal(100), now, end)
    assert r["exhausted_on"] == "2026-11-14"  # 10/day from today: 50 more takes 5 days
    assert fc.exhaustion(flat, Decimal(50), Decimal(10_000), now, end)["exhausted_on"] is None
    assert fc.exhaustion(flat, Decimal(100), Decimal(100), now, end)["model"] == "already exhausted"
    season = fc.exhaustion(daily_spend(60), Decimal(1000), Decimal(4000), now, end)
    assert season["earliest"] <= season["exhausted_on"] <= (season["latest"] or "9999")


class Hook(BaseHTTPRequestHandler):
    received: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Hook.received.append(orjson.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def hook() -> Iterator[str]:
    Hook.received = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook"
    server.shutdown()
    server.server_close()


def test_a_spike_fires_the_budget_webhook_once(tmp_path: Path, hook: str) -> None:
    now = datetime(2026, 11, 20, 15, tzinfo=UTC)
    first = now.date() - timedelta(days=60)
    rng = random.Random(3)
    rows = []
    for team, seed in (("research", 1), ("search", 2)):
        for d, usd in enumerate(daily_spend(60, seed=seed, start_weekday=first.weekday())):
            for h in range(4):  # the day's spend in four calls
                ts = datetime.combine(first + timedelta(days=d), datetime.min.time(), UTC) + timedelta(hours=6 * h)
                r = event_row(rng, ts, team)
                r["cost_usd"] = format(Decimal(str(round(usd / 4, 6))), "f")
                rows.append(r)
        # today until 15:00, normal for search; research's agents loop: 6x a normal day already
        for h in range(3):
            r = event_row(rng, datetime.combine(now.date(), datetime.min.time(), UTC) + timedelta(hours=4 * h), team)
            r["cost_usd"] = "250" if team == "research" else "20"
            rows.append(r)
    url = f"sqlite:///{tmp_path}/l.db"
    budgets = [Budget(id="research-monthly", limit=Decimal(100_000), scope=(("team", "research"),), webhook=hook),
               Budget(id="search-monthly", limit=Decimal(100_000), scope=(("team", "search"),), webhook=hook)]

    async def run() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        st = open_store(url)
        await st.open()
        await st.write_events(rows)
        wh = Warehouse(url)
        try:
            once = await check(wh, st, budgets, now)
            again = await check(wh, st, budgets, now + timedelta(minutes=30))  # the next periodic check
        finally:
            wh.close()
            await st.close()
        return once, again

    once, again = asyncio.run(run())
    spikes = [a for a in once if a["budget"] == "research-monthly"]
    assert len(spikes) == 1 and spikes[0]["direction"] == "high" and spikes[0]["partial_day"]
    assert spikes[0]["day"] == "2026-11-20" and spikes[0]["notified"] and spikes[0]["delivered"]
    assert not [a for a in once if a["budget"] == "search-monthly"]
    assert [a["notified"] for a in again if a["budget"] == "research-monthly"] == [False]
    assert len(Hook.received) == 1
    body = Hook.received[0]
    assert body["event"] == "budget.anomaly" and body["budget"] == "research-monthly"
    assert body["actual"] == 750.0 and body["actual"] > body["upper"]
