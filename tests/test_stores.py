"""Both ledger stores, same contract: idempotent writes, exact money, keys round-trip."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest

from margin.ledger import event_to_row, open_store
from margin.ledger.keys import key_to_row, new_key, row_to_key
from margin.ledger.schema import MIGRATIONS
from tests.conftest import BACKENDS, fresh_ledger
from tests.test_ledger_writer import event


@pytest.fixture(params=BACKENDS)
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    yield from fresh_ledger(request.param, tmp_path, "s.db")


async def test_writes_are_idempotent_and_money_exact(url: str) -> None:
    store = open_store(url)
    await store.open()
    try:
        rows = [event_to_row(event(i)) for i in range(120)]
        rows[0]["cost_usd"] = "0.000000012345678901"
        await store.write_events(rows)
        await store.write_events(rows[:60])  # a replay after a crash
        assert await store.count_events() == 120
        got = {r["event_id"]: r for r in await store.fetch_events()}
        assert Decimal(got[rows[0]["event_id"]]["cost_usd"]) == Decimal("0.000000012345678901")
        r = got[rows[5]["event_id"]]
        assert datetime.fromisoformat(r["ts_start"]) == datetime.fromisoformat(rows[5]["ts_start"])
        assert (r["team"], r["input_tokens"], r["stream"]) == ("t", 10, 0)
        assert await store.schema_version() == MIGRATIONS[-1].version
        later = await store.fetch_events(since=datetime.now(UTC))
        assert later == []
    finally:
        await store.close()


async def test_keys_round_trip_and_revoke(url: str) -> None:
    store = open_store(url)
    await store.open()
    try:
        secret, key = new_key(org="o", team="t", user="u", app="a", env="prod", models=("m1", "m2"),
                              tags=(("workflow", "kyc"),))
        await store.insert_key(key_to_row(key))
        row = await store.key_by_hash(key.key_hash)
        assert row is not None and row_to_key(row) == key
        assert secret not in str(row)
        assert await store.revoke_key(key.key_id, datetime.now(UTC)) is True
        assert await store.revoke_key(key.key_id, datetime.now(UTC)) is False
        again = await store.key_by_id(key.key_id)
        assert again is not None and not row_to_key(again).active
        assert len(await store.list_keys()) == 1
    finally:
        await store.close()
