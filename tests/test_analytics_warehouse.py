"""The warehouse's queries against a real SQLite ledger: exact sums equal to the ledger's, the
Python reference report, team restriction enforced in SQL, money saved per lever."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest

from margin.analytics import queries as q
from margin.analytics import runs as R
from margin.analytics.filters import Filter, parse_period
from margin.analytics.outcomes import parse_outcome
from margin.analytics.report import spend
from margin.analytics.synthetic import event_row, events
from margin.analytics.warehouse import Warehouse, savings_of
from margin.ledger import open_store

T0 = datetime(2026, 11, 1, tzinfo=UTC)
NOW = datetime(2026, 11, 20, 12, tzinfo=UTC)


def build_ledger(url: str, n: int = 3000, outcomes: bool = True) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Synthetic events over 20 days of November plus one outcome per run (some escalated first
    and resolved later, some failed, some never reported)."""
    rows = list(events(n, T0, 20, seed=11))
    outs: list[dict[str, Any]] = []
    if outcomes:
        rng = random.Random(5)
        runs = sorted({r["run_id"] for r in rows if r["run_id"]})
        for i, run in enumerate(runs):
            if i % 7 == 0:
                continue  # never reported
            status = "success" if i % 3 else "failure"
            if i % 5 == 0:  # escalated first, resolved later: the latest counts
                outs.append(parse_outcome({"run_id": run, "status": "escalated", "ts": "2026-11-25T00:00:00Z"}))
            outs.append(parse_outcome({"run_id": run, "status": status, "value_usd": str(rng.randint(1, 9)),
                                       "ts": "2026-11-26T00:00:00Z"}))

    async def write() -> None:
        st = open_store(url)
        await st.open()
        await st.write_events(rows)
        for o in outs:
            await st.insert_outcome(o)
        await st.close()

    asyncio.run(write())
    return rows, outs


@pytest.fixture(scope="module")
def ledger(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Warehouse, list[dict[str, Any]], str]]:
    url = f"sqlite:///{tmp_path_factory.mktemp('wh')}/l.db"
    rows, _ = build_ledger(url)
    wh = Warehouse(url)
    wh.refresh_blocking()
    yield wh, rows, url
    wh.close()


def test_spend_by_matches_the_python_reference(ledger: tuple[Warehouse, list[dict[str, Any]], str]) -> None:
    wh, rows, _ = ledger
    for by in (["team", "model"], ["tag:feature", "day"], ["user"]):
        got = {tuple(r[b] for b in by): r for r in q.spend_by(wh, Filter(), by)}
        ref = {tuple(r[b] for b in by): r for r in spend(rows, by)}
        assert got.keys() == ref.keys()
        for k, r in ref.items():
            g = got[k]
            assert Decimal(g["cost_usd"]) == Decimal(r["cost_usd"]), k
            assert (g["requests"], g["errors"], g["input_tokens"], g["output_tokens"]) == (
                r["requests"], r["errors"], r["input_tokens"], r["output_tokens"])
            assert g["p95_ms"] == pytest.approx(r["p95_ms"], abs=0.06)


def test_team_restriction_is_in_every_query(ledger: tuple[Warehouse, list[dict[str, Any]], str]) -> None:
    wh, rows, _ = ledger
    f = Filter(team="legal")
    legal = [r for r in rows if r["team"] == "legal"]
    assert {r["team"] for r in q.spend_by(wh, f, ["team"])} == {"legal"}
    assert Decimal(q.overview(wh, f, NOW)["cost_usd"]) == sum(Decimal(r["cost_usd"]) for r in legal)
    assert {r["key"] for r in q.top_spenders(wh, f, "team")} == {"legal"}
    assert sum(int(r["requests"]) for r in q.model_mix(wh, f)) == len(legal)
    assert sum(Decimal(r["cost_usd"]) for r in q.spend_series(wh, f, "model", "day")) == sum(
        Decimal(r["cost_usd"]) for r in legal)
    legal_runs = {r["run_id"] for r in legal if r["run_id"]}
    assert {r["run_id"] for r in R.runs(wh, f, limit=10_000)} == legal_runs
    assert sum(x["runs"] for x in R.cost_per_outcome(wh, f)) == len(legal_runs)
    other = next(r["run_id"] for r in rows if r["run_id"] and r["team"] != "legal")
    assert R.run_steps(wh, other, f) == []
    assert R.run_steps(wh, other) != []


def test_overview_and_series(ledger: tuple[Warehouse, list[dict[str, Any]], str]) -> None:
    wh, rows, _ = ledger
    ov = q.overview(wh, Filter(since=T0, until=NOW), NOW)
    in_range = [r for r in rows if r["ts_start"] < NOW.isoformat()]
    assert ov["requests"] == len(in_range)
    assert ov["error_rate"] == round(sum(r["status"] >= 400 for r in in_range) / len(in_range), 4)
    assert ov["cache_hit_rate"] == round(sum(r["cache_hit"] is not None for r in in_range) / len(in_range), 4)
    today = [r for r in rows if "2026-11-20T00" <= r["ts_start"] < NOW.isoformat()]
    assert Decimal(ov["spend_today_usd"]) == sum(Decimal(r["cost_usd"]) for r in today)
    assert ov["spend_last_month_usd"] == "0" and ov["month_change"] is None
    series = q.spend_series(wh, Filter(), "user", "day", top=3)
    assert len({r["key"] for r in series} - {"other"}) == 3
    assert sum(Decimal(r["cost_usd"]) for r in series) == sum(Decimal(r["cost_usd"]) for r in rows)
    hours = q.spend_series(wh, Filter(since=T0, until=T0 + timedelta(days=1)), None, "hour")
    assert all(r["bucket"].startswith("2026-11-01T") for r in hours)


def test_levers_sum_saved_entries_and_fall_back(ledger: tuple[Warehouse, list[dict[str, Any]], str]) -> None:
    wh, rows, _ = ledger
    want: dict[str, Decimal] = {}
    for r in rows:
        if r["lever"]:
            want[r["lever"]] = want.get(r["lever"], Decimal(0)) + Decimal(r["avoided_cost_usd"])
    got = {r["lever"]: Decimal(r["saved_usd"]) for r in q.levers(wh, Filter())}
    assert got == want and set(got) == {"cache", "compression"}
    # Several levers on one event: each entry counts for its own lever.
    row = {"event_id": "e", "lever": "routing,compression", "avoided_cost_usd": "0.3", "tokens_saved": 30,
           "actions": orjson.dumps([{"action": "saved", "lever": "routing", "usd": "0.1", "tokens": 0},
                                    {"action": "saved", "lever": "compression", "usd": "0.2", "tokens": 30}]).decode()}
    assert sorted(savings_of(row)) == [("e", "compression", "0.2", 30), ("e", "routing", "0.1", 0)]


def test_reroutes_burn_down_and_steps(ledger: tuple[Warehouse, list[dict[str, Any]], str]) -> None:
    wh, rows, _ = ledger
    down = [r for r in q.reroutes(wh, Filter()) if r["kind"] == "downgrade"]
    assert sum(r["calls"] for r in down) == sum('"downgrade"' in r["actions"] for r in rows)
    start, end = parse_period("2026-11")
    burn = q.burn_down(wh, Filter(), {"team": "search", "user": "*"}, start, end, Decimal(100), NOW)
    search = sum(Decimal(r["cost_usd"]) for r in rows if r["team"] == "search" and r["ts_start"] < NOW.isoformat())
    assert Decimal(burn[-1]["cumulative_usd"]) == search
    assert Decimal(burn[-1]["remaining_usd"]) == Decimal(100) - search
    run = next(r["run_id"] for r in rows if r["run_id"])
    steps = R.run_steps(wh, run)
    assert [s["step"] for s in steps] == [r["step"] for r in rows if r["run_id"] == run]


def test_refresh_is_incremental_and_a_new_ledger_resets(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/a.db"
    rows = [event_row(random.Random(i), T0 + timedelta(hours=i), "search") for i in range(50)]

    async def write(u: str, rs: list[dict[str, Any]]) -> None:
        st = open_store(u)
        await st.open()
        await st.write_events(rs)
        await st.close()

    asyncio.run(write(url, rows[:30]))
    path = tmp_path / "wh.duckdb"
    wh = Warehouse(url, path)
    assert wh.refresh_blocking().events == 30
    wh.close()
    asyncio.run(write(url, rows[20:]))
    wh = Warehouse(url, path)  # kept on disk: only the new rows are read
    assert wh.refresh_blocking().events == 20 and wh.counts()["events"] == 50
    wh.close()
    other = f"sqlite:///{tmp_path}/b.db"
    asyncio.run(write(other, rows[:5]))
    wh = Warehouse(other, path)
    wh.refresh_blocking()
    assert wh.counts()["events"] == 5  # never mixes two ledgers
    wh.close()
