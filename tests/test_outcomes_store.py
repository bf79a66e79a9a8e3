"""Outcomes, alerts and incremental reads in both ledger stores (real SQLite and PostgreSQL), and
the warehouse's sync: late rows never missed, nothing counted twice."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import asyncpg
import pytest

from margin.analytics.outcomes import parse_outcome
from margin.analytics.synthetic import events
from margin.analytics.warehouse import Warehouse
from margin.ledger import Store, open_store
from margin.ledger.postgres import PostgresStore, _to_pg
from margin.ledger.schema import EVENT_FIELDS, quoted
from tests.conftest import BACKENDS, drop_pg_database, fresh_ledger, new_pg_database, require_postgres

T0 = datetime(2026, 11, 1, tzinfo=UTC)


@pytest.fixture(params=BACKENDS)
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    yield from fresh_ledger(request.param, tmp_path, "s.db")


@pytest.fixture
async def store(url: str) -> AsyncIterator[Store]:
    s = open_store(url)
    await s.open()
    yield s
    await s.close()


async def test_outcomes_are_idempotent_and_exact(store: Store) -> None:
    o1 = parse_outcome({"run_id": "r1", "workflow": "triage", "status": "escalated", "value_usd": "0.000000001",
                        "quality": 0.5, "human_minutes": 3, "metadata": {"ticket": 7}, "ts": "2026-11-02T10:00:00Z"},
                       now=T0 + timedelta(days=3))
    o2 = parse_outcome({"run_id": "r1", "status": "success", "ts": "2026-11-02T11:00:00+00:00"},
                       now=T0 + timedelta(days=3))
    assert await store.insert_outcome(o1) is True
    assert await store.insert_outcome(o1) is False  # the client retried the same POST
    assert await store.insert_outcome(o2) is True
    rows = await store.fetch_outcomes()
    assert [r["status"] for r in rows] == ["escalated", "success"]
    assert Decimal(rows[0]["value_usd"]) == Decimal("0.000000001") and rows[1]["value_usd"] is None
    assert datetime.fromisoformat(rows[0]["ts"]) == datetime(2026, 11, 2, 10, tzinfo=UTC)
    assert rows[0]["metadata"].replace(" ", "") == '{"ticket":7}'
    assert rows[0]["quality"] == 0.5 and rows[0]["human_minutes"] == 3
    assert await store.fetch_outcomes(since=datetime(2026, 11, 2, 10, 30, tzinfo=UTC)) == [rows[1]]
    assert await store.fetch_outcomes(until=datetime(2026, 11, 2, 10, 30, tzinfo=UTC)) == [rows[0]]
    assert await store.schema_version() >= 3


async def test_alert_claims_once(store: Store) -> None:
    assert await store.claim_alert("anomaly:b:2026-11-05", "anomaly", '{"x": 1}', T0) is True
    assert await store.claim_alert("anomaly:b:2026-11-05", "anomaly", '{"x": 2}', T0) is False
    assert await store.claim_alert("anomaly:b:2026-11-06", "anomaly", "{}", T0) is True


async def test_pages_are_ordered_by_commit_position(store: Store) -> None:
    rows = list(events(250, T0, 5, seed=3))
    start = await store.sync_watermark("events")
    await store.write_events(rows[:100])
    await store.write_events(rows[100:])
    seen: list[str] = []
    after = None
    while True:
        page = await store.fetch_page("events", start, after, 60)
        if not page:
            break
        seen += [r["event_id"] for r in page]
        after = (page[-1]["_pos"], page[-1]["event_id"])
    assert sorted(seen) == sorted(r["event_id"] for r in rows) and len(seen) == 250
    assert await store.fetch_page("events", await store.sync_watermark("events"), None, 10) == []


async def test_warehouse_picks_up_late_rows_without_double_counting(url: str, store: Store) -> None:
    rows = list(events(600, T0, 10, seed=4))
    await store.write_events(rows[:300])
    wh = Warehouse(url, page_size=128)
    await wh.refresh(store)
    # A spool replay: old timestamps, some already stored; and a late outcome for an old run.
    await store.write_events(rows[250:])
    run = next(r["run_id"] for r in rows if r["run_id"])
    await store.insert_outcome(parse_outcome({"run_id": run, "status": "success"}, now=T0))
    stats = await wh.refresh(store)
    assert stats.events == 300 and stats.outcomes == 1
    assert (await wh.refresh(store)).events == 0
    total = sum(Decimal(r["cost_usd"]) for r in rows)
    got = wh.query("SELECT count(*) AS n, sum(cost_usd) AS s FROM events")[0]
    assert got["n"] == 600 and got["s"] == total
    in_runs = sum((Decimal(r["cost_usd"]) for r in rows if r["run_id"]), Decimal(0))
    assert wh.query("SELECT sum(cost) AS s FROM runs")[0]["s"] == in_runs  # run aggregates rebuilt too
    wh.close()


def test_postgres_commits_out_of_order_are_not_missed() -> None:
    """Replica A starts a transaction first and commits last; a refresh in between must not move
    past A's rows."""
    require_postgres()
    url = new_pg_database()
    try:
        asyncio.run(_out_of_order(url))
    finally:
        drop_pg_database(url)


async def _out_of_order(url: str) -> None:
    store = PostgresStore(url)
    await store.open()
    rows = list(events(40, T0, 2, seed=5))
    wh = Warehouse(url)
    a = await asyncpg.connect(url)
    tx = a.transaction()
    await tx.start()
    await a.execute("SELECT pg_current_xact_id()")  # A has the older transaction id
    cols = quoted(EVENT_FIELDS)
    marks = ", ".join(f"${i + 1}" for i in range(len(EVENT_FIELDS)))
    await a.execute(f"INSERT INTO events ({cols}) VALUES ({marks})",
                    *(_to_pg(f, rows[0].get(f)) for f in EVENT_FIELDS))
    await store.write_events(rows[1:])  # replica B commits
    assert (await wh.refresh(store)).events == 39
    await tx.commit()
    await a.close()
    assert (await wh.refresh(store)).events == 1
    assert wh.counts()["events"] == 40
    wh.close()
    await store.close()
