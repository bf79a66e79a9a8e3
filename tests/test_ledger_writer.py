"""The batched writer against a real SQLite file: spool on outage, replay once, never drop."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import orjson
import uuid_utils

from margin.domain import Attribution, Cost, Event, Usage
from margin.ledger import LedgerWriter, Spool, event_to_row
from margin.ledger.sqlite import SQLiteStore


def event(i: int) -> Event:
    now = datetime.now(UTC)
    return Event(event_id=str(uuid_utils.uuid7()), ts_start=now, ts_end=now, request_id=f"r{i}", endpoint="chat",
                 attribution=Attribution(team="t"), requested_model="m", model="m", provider="p",
                 usage=Usage(input_tokens=10, output_tokens=5),
                 cost=Cost(input_usd=Decimal("0.000001"), output_usd=Decimal("0.000002")))


def hold_lock(path: str, seconds: float, ready: threading.Event) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN EXCLUSIVE")
    ready.set()
    threading.Event().wait(seconds)
    conn.execute("ROLLBACK")
    conn.close()


def lock_store(path: str, seconds: float) -> threading.Thread:
    """Another connection holds the database exclusively for `seconds`: every write fails."""
    ready = threading.Event()
    locker = threading.Thread(target=hold_lock, args=(path, seconds, ready))
    locker.start()
    ready.wait()
    return locker


async def make(tmp: Path, **kw: float) -> tuple[SQLiteStore, LedgerWriter]:
    store = SQLiteStore(f"sqlite:///{tmp}/l.db", busy_timeout_ms=200)
    await store.open()
    w = LedgerWriter(store, Spool(tmp / "spool"), flush_interval_s=0.005, retry_interval_s=0.2, **kw)  # type: ignore[arg-type]
    await w.start()
    return store, w


async def test_events_are_written_in_batches_and_flushed_on_close(tmp_path: Path) -> None:
    store, w = await make(tmp_path)
    for i in range(1000):
        w.append(event(i))
    await w.close()
    assert await store.count_events() == 1000
    assert w.stats.written == 1000 and w.stats.spooled == 0
    row = (await store.fetch_events())[0]
    assert row["cost_usd"] == "0.000003" and row["team"] == "t"


async def test_outage_spools_then_replays_exactly_once(tmp_path: Path) -> None:
    store, w = await make(tmp_path)
    locker = lock_store(store.path, 1.5)
    for i in range(300):
        w.append(event(i))
        if i % 50 == 0:
            await asyncio.sleep(0.05)
    await asyncio.sleep(0.4)
    assert not w.stats.store_up and w.stats.spooled > 0
    locker.join()
    for i in range(300, 400):  # traffic continues while the store comes back
        w.append(event(i))
    await asyncio.sleep(1.0)
    await w.flush()
    assert w.stats.store_up
    await w.close()
    assert await store.count_events() == 400
    assert len({r["event_id"] for r in await store.fetch_events()}) == 400
    assert w.spool.count() == 0


async def test_replay_is_idempotent_and_survives_a_crash(tmp_path: Path) -> None:
    store, w = await make(tmp_path)
    evs = [event(i) for i in range(50)]
    for e in evs:
        w.append(e)
    await w.close()
    # A crash after the store committed but before the spool was cleared: the same rows again,
    # plus a torn last line, left for the next start.
    spool = Spool(tmp_path / "spool")
    spool.append([event_to_row(e) for e in evs] + [event_to_row(event(99))])
    with (tmp_path / "spool" / "spool-live.jsonl").open("ab") as f:
        f.write(orjson.dumps(event_to_row(event(100)))[:40])
    _, w2 = await make(tmp_path)
    await asyncio.sleep(0.3)
    await w2.close()
    assert await store.count_events() == 51
    assert w2.spool.count() == 0


async def test_full_queue_spools_inline_instead_of_dropping(tmp_path: Path) -> None:
    store, w = await make(tmp_path, queue_size=10)
    for i in range(200):  # no await: the writer task cannot drain, the queue overflows
        w.append(event(i))
    assert w.stats.overflowed == 190
    await w.close()
    await asyncio.sleep(0)
    _, w2 = await make(tmp_path)  # overflowed rows are replayed by the next writer start
    await asyncio.sleep(0.3)
    await w2.close()
    assert await store.count_events() == 200


async def test_store_down_at_close_keeps_rows_on_disk(tmp_path: Path) -> None:
    store, w = await make(tmp_path)
    locker = lock_store(store.path, 1.0)
    for i in range(20):
        w.append(event(i))
    await w.close()
    locker.join()
    written = await store.count_events()
    assert written + w.spool.count() == 20
    _, w2 = await make(tmp_path)
    await asyncio.sleep(0.3)
    await w2.close()
    assert await store.count_events() == 20
