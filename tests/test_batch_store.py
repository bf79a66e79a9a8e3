"""The batch lane's job store on both ledger databases: replicas claiming concurrently never get
the same item, a dead replica's lease is taken over, only the lease holder's answer is kept, and a
batch is finalised once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from margin.gateway.batch_files import result_files
from margin.ledger import open_store
from margin.ledger.jobs import JobStore
from tests.conftest import BACKENDS, fresh_ledger


@pytest.fixture(params=BACKENDS)
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    yield from fresh_ledger(request.param, tmp_path, "jobs.db")


def item(i: int, batch_id: str = "batch_1", now: float = 0.0, status: str = "queued") -> dict[str, Any]:
    return {"item_id": f"batch_req_{i:05d}", "batch_id": batch_id, "line": i + 1, "custom_id": f"c{i}",
            "key_id": "key_a", "endpoint": "chat", "model": "m", "body": "{}", "headers": "{}", "status": status,
            "reason": None, "attempts": 0, "runs": 0, "not_before": now, "expires_at": now + 3600, "lease_owner": None,
            "lease_until": None, "event_id": None, "request_id": f"{batch_id}:c{i}", "response_status": None,
            "response_request_id": None, "response_body": None, "error_code": None, "error_message": None,
            "cost_usd": None, "saved_usd": None, "upstream_id": None, "holds": None, "created_at": now,
            "finished_at": None}


def batch(n: int, batch_id: str = "batch_1", now: int = 0) -> dict[str, Any]:
    return {"batch_id": batch_id, "key_id": "key_a", "endpoint": "/v1/chat/completions", "input_file_id": "file-1",
            "completion_window": "24h", "status": "in_progress", "total": n, "created_at": now, "in_progress_at": now,
            "expires_at": now + 86400, "finalizing_at": None, "completed_at": None, "failed_at": None,
            "expired_at": None, "cancelling_at": None, "cancelled_at": None, "output_file_id": None,
            "error_file_id": None, "metadata": None, "headers": "{}"}


async def test_migration_4_creates_the_lane_tables(url: str) -> None:
    store = open_store(url)
    await store.open()
    try:
        assert await store.schema_version() >= 4
    finally:
        await store.close()


async def test_concurrent_replicas_never_claim_the_same_item(url: str) -> None:
    a, b = JobStore(url), JobStore(url)
    await a.open()
    await b.open()
    try:
        now = time.time()
        await a.create_batch(batch(300), [item(i, now=now - 1) for i in range(300)])
        got: dict[str, list[str]] = {"a": [], "b": []}

        async def drain(store: JobStore, name: str) -> None:
            while rows := await store.claim(name, 7, time.time(), time.time() + 60):
                got[name] += [r["item_id"] for r in rows]
                await asyncio.sleep(0)

        await asyncio.gather(drain(a, "a"), drain(b, "b"), drain(a, "a"), drain(b, "b"))
        assert not set(got["a"]) & set(got["b"])
        assert len(got["a"]) + len(got["b"]) == 300 == len(set(got["a"]) | set(got["b"]))
    finally:
        await a.close()
        await b.close()


async def test_a_lapsed_lease_is_taken_over_and_only_the_holder_answers(url: str) -> None:
    s = JobStore(url)
    await s.open()
    try:
        now = time.time()
        await s.create_batch(batch(1), [item(0, now=now - 1)])
        [mine] = await s.claim("dead", 5, now, now + 0.2)
        assert await s.claim("alive", 5, now, now + 60) == [], "held under a live lease"
        [taken] = await s.claim("alive", 5, now + 1, now + 60)  # the lease lapsed: taken over
        assert taken["item_id"] == mine["item_id"]
        late = await s.finish("dead", [(mine["item_id"], {"status": "done", "response_status": 200})])
        assert late == set(), "the replica that lost its lease cannot record an answer"
        done = await s.finish("alive", [(mine["item_id"], {"status": "done", "response_status": 200, "runs": 1})])
        assert done == {mine["item_id"]}
        row = await s.get_item(mine["item_id"])
        assert row is not None and row["status"] == "done" and row["lease_owner"] is None
    finally:
        await s.close()


async def test_a_batch_is_finalised_once_with_its_files(url: str) -> None:
    s = JobStore(url)
    await s.open()
    try:
        await s.create_batch(batch(2), [item(0, status="done"), item(1, status="queued")])
        await s.update_items([("batch_req_00000", {"response_status": 200, "response_body": '{"ok":1}'})], "done")

        def build(b: dict[str, Any], items: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
            return result_files(b, items, 10)

        first = s.finalize("batch_1", "in_progress", "expired", "expired_at", 10, True, build)
        second = s.finalize("batch_1", "in_progress", "expired", "expired_at", 10, True, build)
        assert sorted(await asyncio.gather(first, second)) == [False, True]
        b = await s.get_batch("batch_1")
        assert b is not None and b["status"] == "expired" and b["output_file_id"] and b["error_file_id"]
        out = await s.file_content(b["output_file_id"])
        err = await s.file_content(b["error_file_id"])
        assert out is not None and b'"custom_id":"c0"' in out and b'"status_code":200' in out
        assert err is not None and b"batch_expired" in err and b'"custom_id":"c1"' in err
        counts = await s.item_counts(["batch_1"])
        assert counts["batch_1"] == {"done": 1, "expired": 1}
    finally:
        await s.close()
