"""The batch lane's durable state, in the ledger database (SQLite or PostgreSQL, same URL).

Every statement is written once with `?` placeholders; `jobs_db.py` runs it on SQLite (one
connection, BEGIN IMMEDIATE serialises writers) or PostgreSQL (pooled; claims use FOR UPDATE
SKIP LOCKED so several replicas never take the same item). Items are claimed with a lease: a
replica that dies leaves its items to be taken over when the lease lapses, and an answer is only
kept if the replica still holds the lease (`finish`), so an item has one answer."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from margin.ledger.jobs_db import Db, open_db
from margin.ledger.jobs_schema import BATCH_FIELDS, FILE_FIELDS, ITEM_FIELDS, UPSTREAM_FIELDS
from margin.ledger.schema import Row

_META = ", ".join(f for f in FILE_FIELDS if f != "content")
# Items a worker may take: queued and due, or running under a lease that lapsed (its replica died).
_DUE = "(status = 'queued' AND not_before <= ?) OR (status = 'running' AND lease_until < ?)"


def _marks(n: int) -> str:
    return ", ".join("?" * n)


def _insert(table: str, fields: Sequence[str]) -> str:
    return f"INSERT INTO {table} ({', '.join(fields)}) VALUES ({_marks(len(fields))})"


Build = Callable[[Row, list[Row]], dict[str, Row]]  # (batch, items) -> {"output"|"error": file row}


class JobStore:
    def __init__(self, url: str):
        self.db: Db = open_db(url)

    async def open(self) -> None:
        await self.db.open()

    async def close(self) -> None:
        await self.db.close()

    # -- files ------------------------------------------------------------------------------------
    async def insert_file(self, row: Row) -> None:
        await self.db.execute(_insert("batch_files", FILE_FIELDS), *(row[f] for f in FILE_FIELDS))

    async def get_file(self, file_id: str) -> Row | None:
        rows = await self.db.fetch(f"SELECT {_META} FROM batch_files WHERE file_id = ?", file_id)
        return rows[0] if rows else None

    async def file_content(self, file_id: str) -> bytes | None:
        rows = await self.db.fetch("SELECT content FROM batch_files WHERE file_id = ?", file_id)
        return bytes(rows[0]["content"]) if rows else None

    async def list_files(self, key_id: str | None, purpose: str | None, after: str | None, limit: int) -> list[Row]:
        where, args = self._owned(key_id, after, "file_id")
        if purpose:
            where, args = f"{where} AND purpose = ?", [*args, purpose]
        return await self.db.fetch(f"SELECT {_META} FROM batch_files WHERE {where} ORDER BY file_id DESC LIMIT ?",
                                   *args, limit)

    async def delete_file(self, file_id: str) -> bool:
        return await self.db.execute("DELETE FROM batch_files WHERE file_id = ?", file_id) > 0

    @staticmethod
    def _owned(key_id: str | None, after: str | None, id_col: str) -> tuple[str, list[Any]]:
        where, args = "1 = 1", []
        if key_id is not None:  # None: the admin key, who sees everything
            where, args = f"{where} AND key_id = ?", [key_id]
        if after:  # ids are time-ordered (uuid7): the page after `after` in newest-first order
            where, args = f"{where} AND {id_col} < ?", [*args, after]
        return where, args

    # -- batches ----------------------------------------------------------------------------------
    async def create_batch(self, batch: Row, items: list[Row]) -> None:
        async with self.db.tx() as t:
            await t.execute(_insert("batches", BATCH_FIELDS), *(batch[f] for f in BATCH_FIELDS))
            await t.executemany(_insert("batch_items", ITEM_FIELDS),
                                [tuple(self.db.param(f, r[f]) for f in ITEM_FIELDS) for r in items])

    async def get_batch(self, batch_id: str) -> Row | None:
        rows = await self.db.fetch("SELECT * FROM batches WHERE batch_id = ?", batch_id)
        return rows[0] if rows else None

    async def list_batches(self, key_id: str | None, after: str | None, limit: int) -> list[Row]:
        where, args = self._owned(key_id, after, "batch_id")
        return await self.db.fetch(f"SELECT * FROM batches WHERE {where} ORDER BY batch_id DESC LIMIT ?",
                                   *args, limit)

    async def active_batches(self) -> list[Row]:
        return await self.db.fetch("SELECT * FROM batches WHERE status IN ('in_progress', 'cancelling')")

    async def item_counts(self, batch_ids: Sequence[str]) -> dict[str, dict[str, int]]:
        if not batch_ids:
            return {}
        rows = await self.db.fetch(
            f"SELECT batch_id, status, COUNT(*) AS n FROM batch_items WHERE batch_id IN ({_marks(len(batch_ids))}) "
            "GROUP BY batch_id, status", *batch_ids)
        out: dict[str, dict[str, int]] = {b: {} for b in batch_ids}
        for r in rows:
            out[r["batch_id"]][r["status"]] = int(r["n"])
        return out

    async def cancel_batch(self, batch_id: str, now: int) -> bool:
        """in_progress -> cancelling; items not yet started are cancelled at once."""
        async with self.db.tx() as t:
            n = await t.execute("UPDATE batches SET status = 'cancelling', cancelling_at = ? "
                                "WHERE batch_id = ? AND status IN ('validating', 'in_progress')", now, batch_id)
            if n:
                await t.execute("UPDATE batch_items SET status = 'cancelled', finished_at = ?, "
                                "error_code = 'batch_cancelled' WHERE batch_id = ? AND status IN ('queued', 'forward')",
                                float(now), batch_id)
            return n > 0

    async def expire_queued(self, batch_id: str, now: float) -> int:
        return await self.db.execute(
            "UPDATE batch_items SET status = 'expired', finished_at = ?, error_code = 'batch_expired' "
            "WHERE batch_id = ? AND status IN ('queued', 'forward')", now, batch_id)

    async def finalize(self, batch_id: str, from_status: str, to_status: str, stamp: str, now: int,
                       expire_queued: bool, build: Build) -> bool:
        """Move a batch to a final status once, across replicas: the conditional UPDATE is the claim;
        the output/error files are built from the items in the same transaction."""
        async with self.db.tx() as t:
            n = await t.execute(f"UPDATE batches SET status = ?, {stamp} = ?, finalizing_at = ? "
                                "WHERE batch_id = ? AND status = ?", to_status, now, now, batch_id, from_status)
            if not n:
                return False
            if expire_queued:
                await t.execute("UPDATE batch_items SET status = 'expired', finished_at = ?, error_code = "
                                "'batch_expired' WHERE batch_id = ? AND status IN ('queued', 'forward')",
                                float(now), batch_id)
            batch = (await t.fetch("SELECT * FROM batches WHERE batch_id = ?", batch_id))[0]
            items = await t.fetch("SELECT * FROM batch_items WHERE batch_id = ? ORDER BY line", batch_id)
            files = build(batch, items)
            for f in files.values():
                await t.execute(_insert("batch_files", FILE_FIELDS), *(f[k] for k in FILE_FIELDS))
            await t.execute("UPDATE batches SET output_file_id = ?, error_file_id = ? WHERE batch_id = ?",
                            files["output"]["file_id"] if "output" in files else None,
                            files["error"]["file_id"] if "error" in files else None, batch_id)
            return True

    # -- items ------------------------------------------------------------------------------------
    async def insert_item(self, row: Row) -> None:
        await self.db.execute(_insert("batch_items", ITEM_FIELDS), *(self.db.param(f, row[f]) for f in ITEM_FIELDS))

    async def get_item(self, item_id: str) -> Row | None:
        rows = await self.db.fetch("SELECT * FROM batch_items WHERE item_id = ?", item_id)
        return rows[0] if rows else None

    async def claim(self, owner: str, n: int, now: float, lease_until: float) -> list[Row]:
        if n <= 0:
            return []
        async with self.db.tx() as t:
            ids = [r["item_id"] for r in await t.fetch(
                f"SELECT item_id FROM batch_items WHERE {_DUE} ORDER BY not_before, created_at, line LIMIT ?"
                f"{self.db.skip_locked}", now, now, n)]
            if not ids:
                return []
            await t.execute(f"UPDATE batch_items SET status = 'running', lease_owner = ?, lease_until = ? "
                            f"WHERE item_id IN ({_marks(len(ids))})", owner, lease_until, *ids)
            return await t.fetch(f"SELECT * FROM batch_items WHERE item_id IN ({_marks(len(ids))})", *ids)

    async def renew(self, owner: str, item_ids: Sequence[str], lease_until: float) -> int:
        if not item_ids:
            return 0
        return await self.db.execute(
            f"UPDATE batch_items SET lease_until = ? WHERE lease_owner = ? AND status = 'running' "
            f"AND item_id IN ({_marks(len(item_ids))})", lease_until, owner, *item_ids)

    async def finish(self, owner: str, updates: Sequence[tuple[str, Row]]) -> set[str]:
        """Record run results; only items this replica still leases are updated (a result for an
        item whose lease lapsed and was taken over is dropped). Returns the item ids updated."""
        done: set[str] = set()
        async with self.db.tx() as t:
            for item_id, fields in updates:
                cols = list(fields)
                sets = ", ".join(f"{c} = ?" for c in cols)
                n = await t.execute(
                    f"UPDATE batch_items SET {sets}, lease_owner = NULL, lease_until = NULL "
                    "WHERE item_id = ? AND lease_owner = ? AND status = 'running'",
                    *(self.db.param(c, fields[c]) for c in cols), item_id, owner)
                if n:
                    done.add(item_id)
        return done

    async def update_item(self, item_id: str, fields: Row, where_status: str) -> bool:
        cols = list(fields)
        return await self.db.execute(
            f"UPDATE batch_items SET {', '.join(f'{c} = ?' for c in cols)} WHERE item_id = ? AND status = ?",
            *(self.db.param(c, fields[c]) for c in cols), item_id, where_status) > 0

    async def update_items(self, updates: Sequence[tuple[str, Row]], where_status: str) -> None:
        """Several items' fields in one transaction, each only if still in `where_status`."""
        if not updates:
            return
        async with self.db.tx() as t:
            for item_id, fields in updates:
                cols = list(fields)
                await t.execute(f"UPDATE batch_items SET {', '.join(f'{c} = ?' for c in cols)} "
                                "WHERE item_id = ? AND status = ?",
                                *(self.db.param(c, fields[c]) for c in cols), item_id, where_status)

    async def release(self, owner: str, item_ids: Sequence[str], ran: bool) -> None:
        """Give back items this replica stops running (clean shutdown): queued again. `ran`: the
        run began and may have recorded its event, so the next run takes a new event id."""
        if item_ids:
            await self.db.execute(
                "UPDATE batch_items SET status = 'queued', lease_owner = NULL, lease_until = NULL, "
                f"runs = runs + ? WHERE lease_owner = ? AND status = 'running' "
                f"AND item_id IN ({_marks(len(item_ids))})", int(ran), owner, *item_ids)

    async def expire_deferred(self, now: float) -> int:
        return await self.db.execute(
            "UPDATE batch_items SET status = 'expired', finished_at = ?, error_code = 'deferred_expired' "
            "WHERE batch_id IS NULL AND status = 'queued' AND expires_at <= ?", now, now)

    async def events_present(self, event_ids: Sequence[str]) -> set[str]:
        """Which of these ledger events are committed (an item is only finished once its event is)."""
        if not event_ids:
            return set()
        rows = await self.db.fetch(
            f"SELECT event_id FROM events WHERE event_id IN ({_marks(len(event_ids))})",
            *(self.db.param("event_id", e) for e in event_ids))
        return {str(r["event_id"]) for r in rows}

    # -- provider batches -------------------------------------------------------------------------
    async def forward_due(self, now: float) -> list[Row]:
        """(batch_id, model) pairs with items waiting to be sent to a provider's batch API."""
        return await self.db.fetch(
            "SELECT DISTINCT batch_id, model FROM batch_items WHERE status = 'forward' AND not_before <= ?", now)

    async def open_upstream(self, up: Row, models: Sequence[str], limit: int, now: float) -> list[Row]:
        """Create a provider-batch record and move up to `limit` due items of its batch and models
        into it, in one transaction (items taken by another replica meanwhile are skipped)."""
        async with self.db.tx() as t:
            ids = [r["item_id"] for r in await t.fetch(
                f"SELECT item_id FROM batch_items WHERE batch_id = ? AND status = 'forward' AND not_before <= ? "
                f"AND model IN ({_marks(len(models))}) ORDER BY line LIMIT ?{self.db.skip_locked}",
                up["batch_id"], now, *models, limit)]
            if not ids:
                return []
            up = {**up, "items": len(ids)}
            await t.execute(_insert("batch_upstreams", UPSTREAM_FIELDS), *(up[f] for f in UPSTREAM_FIELDS))
            await t.execute(f"UPDATE batch_items SET status = 'upstream', upstream_id = ? "
                            f"WHERE item_id IN ({_marks(len(ids))})", up["upstream_id"], *ids)
            return await t.fetch(f"SELECT * FROM batch_items WHERE item_id IN ({_marks(len(ids))}) ORDER BY line",
                                 *ids)

    async def upstream_items(self, upstream_id: str) -> list[Row]:
        return await self.db.fetch("SELECT * FROM batch_items WHERE upstream_id = ? AND status = 'upstream' "
                                   "ORDER BY line", upstream_id)

    async def claim_upstreams(self, owner: str, now: float, lease_until: float) -> list[Row]:
        """Provider batches due for a poll, or left half-submitted by a replica that died."""
        async with self.db.tx() as t:
            ids = [r["upstream_id"] for r in await t.fetch(
                "SELECT upstream_id FROM batch_upstreams WHERE status != 'done' AND next_poll <= ? "
                f"AND (lease_until IS NULL OR lease_until < ? OR lease_owner = ?) LIMIT 16{self.db.skip_locked}",
                now, now, owner)]
            if not ids:
                return []
            await t.execute(f"UPDATE batch_upstreams SET lease_owner = ?, lease_until = ? "
                            f"WHERE upstream_id IN ({_marks(len(ids))})", owner, lease_until, *ids)
            return await t.fetch(f"SELECT * FROM batch_upstreams WHERE upstream_id IN ({_marks(len(ids))})", *ids)

    async def set_upstream(self, upstream_id: str, fields: Row) -> None:
        cols = list(fields)
        await self.db.execute(f"UPDATE batch_upstreams SET {', '.join(f'{c} = ?' for c in cols)} "
                              "WHERE upstream_id = ?", *(fields[c] for c in cols), upstream_id)

