"""PostgreSQL ledger (asyncpg): the scale-out store shared by many gateway replicas."""

from __future__ import annotations

import asyncio
from datetime import datetime
from decimal import Decimal
from typing import Any

import asyncpg
import orjson

from margin.ledger.schema import (
    EVENT_FIELDS,
    JSON_FIELDS,
    KEY_FIELDS,
    MIGRATIONS,
    MONEY_FIELDS,
    OUTCOME_FIELDS,
    UPDATABLE_KEY_FIELDS,
    Row,
    quoted,
)
from margin.ledger.store import SYNC_KEYS, StoreUnavailable, SyncTable

_STAGE = "CREATE TEMP TABLE IF NOT EXISTS events_in (LIKE events) ON COMMIT DELETE ROWS"
_FROM_STAGE = (
    f"INSERT INTO events ({quoted(EVENT_FIELDS)}) SELECT {quoted(EVENT_FIELDS)} FROM events_in "
    "ON CONFLICT (event_id) DO NOTHING"
)
_MIGRATION_LOCK = 0x6D617267  # "marg": replicas starting together migrate one at a time

# Errors that mean "the database is not there right now" rather than "this row is wrong".
_OUTAGE = (OSError, asyncpg.PostgresConnectionError, asyncpg.CannotConnectNowError,
           asyncpg.InterfaceError, asyncpg.exceptions.AdminShutdownError, TimeoutError)


def _to_pg(field: str, value: Any) -> Any:
    if value is None:
        return None
    if field in MONEY_FIELDS:
        return Decimal(value)
    if field in ("ts_start", "ts_end", "created_at", "revoked_at"):
        return datetime.fromisoformat(value) if isinstance(value, str) else value
    if field == "stream":
        return bool(value)
    return value


def _from_pg(record: asyncpg.Record) -> Row:
    out: Row = {}
    for k, v in record.items():
        if isinstance(v, Decimal):
            v = str(v)
        elif isinstance(v, datetime):
            v = v.isoformat()
        elif k == "event_id":
            v = str(v)
        elif k == "stream":
            v = int(v)
        out[k] = v
    return out


async def _migrate(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations "
            "(version INTEGER PRIMARY KEY, name TEXT, applied_at TIMESTAMPTZ DEFAULT now())"
        )
        done = {r[0] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        for m in MIGRATIONS:
            if m.version in done:
                continue
            for stmt in m.postgres:
                await conn.execute(stmt)
            await conn.execute("INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", m.version, m.name)


class PostgresStore:
    def __init__(self, url: str, min_size: int = 1, max_size: int = 4, timeout_s: float = 5.0):
        self.url = url
        self._min, self._max, self._timeout = min_size, max_size, timeout_s
        self._pool: asyncpg.Pool | None = None
        self._pool_lock = asyncio.Lock()

    def is_data_error(self, e: BaseException) -> bool:
        return isinstance(e, asyncpg.DataError | asyncpg.IntegrityConstraintViolationError | OverflowError
                          | ValueError | TypeError)

    async def _get_pool(self) -> asyncpg.Pool:
        """Connect and migrate on first use, so a database that was down at start-up is
        migrated the moment it comes back, before any replayed row reaches it."""
        if self._pool is not None:
            return self._pool
        async with self._pool_lock:  # concurrent callers must not each open a pool
            return await self._open_pool()

    async def _open_pool(self) -> asyncpg.Pool:
        if self._pool is None:
            try:
                pool = await asyncpg.create_pool(
                    self.url, min_size=self._min, max_size=self._max, timeout=self._timeout,
                    command_timeout=30,
                )
            except _OUTAGE as e:
                raise StoreUnavailable(f"postgres: {e}") from e
            try:
                await _migrate(pool)
            except BaseException as e:
                pool.terminate()
                if isinstance(e, _OUTAGE):
                    raise StoreUnavailable(f"postgres: {e}") from e
                raise
            self._pool = pool
        return self._pool

    async def _fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        pool = await self._get_pool()
        try:
            rows: list[asyncpg.Record] = await pool.fetch(sql, *args)
            return rows
        except _OUTAGE as e:
            raise StoreUnavailable(f"postgres: {e}") from e

    async def _execute(self, sql: str, *args: Any) -> str:
        pool = await self._get_pool()
        try:
            status: str = await pool.execute(sql, *args)
            return status
        except _OUTAGE as e:
            raise StoreUnavailable(f"postgres: {e}") from e

    async def open(self) -> None:
        await self._get_pool()

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                await pool.close()
            except _OUTAGE:
                pool.terminate()

    async def schema_version(self) -> int:
        return int((await self._fetch("SELECT MAX(version) FROM schema_migrations"))[0][0])

    async def write_events(self, rows: list[Row]) -> None:
        """COPY the batch into a per-connection temp table, then one INSERT .. ON CONFLICT: bulk
        speed, and a replayed event id is skipped instead of failing the batch."""
        pool = await self._get_pool()
        records = [tuple(_to_pg(f, r.get(f)) for f in EVENT_FIELDS) for r in rows]
        try:
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute(_STAGE)
                await conn.copy_records_to_table("events_in", records=records, columns=list(EVENT_FIELDS))
                await conn.execute(_FROM_STAGE)
        except _OUTAGE as e:
            raise StoreUnavailable(f"postgres: {e}") from e

    async def count_events(self) -> int:
        return int((await self._fetch("SELECT COUNT(*) FROM events"))[0][0])

    async def fetch_events(self, since: datetime | None = None, until: datetime | None = None,
                           run_id: str | None = None, runs_only: bool = False) -> list[Row]:
        rows = await self._fetch(
            "SELECT * FROM events WHERE ($1::timestamptz IS NULL OR ts_start >= $1) "
            "AND ($2::timestamptz IS NULL OR ts_start < $2) AND ($3::text IS NULL OR run_id = $3) "
            "AND (NOT $4 OR run_id IS NOT NULL) ORDER BY ts_start",
            since, until, run_id, runs_only,
        )
        out = [_from_pg(r) for r in rows]
        for r in out:
            for f in JSON_FIELDS:
                if r.get(f) is None:
                    r[f] = "{}" if f == "tags" else "[]"
        return out

    async def fetch_payloads(self, since: datetime | None = None) -> dict[str, Row]:
        rows = await self._fetch("SELECT event_id::text, request::text, response::text FROM payloads "
                                 "WHERE ($1::timestamptz IS NULL OR ts >= $1)", since)
        return {r[0]: {"request": orjson.loads(r[1] or "null"), "response": orjson.loads(r[2] or "null")}
                for r in rows}

    async def insert_key(self, row: Row) -> None:
        sql = (f"INSERT INTO keys ({quoted(KEY_FIELDS)}) VALUES "
               f"({', '.join(f'${i + 1}' for i in range(len(KEY_FIELDS)))})")
        await self._execute(sql, *(_to_pg(f, row.get(f)) for f in KEY_FIELDS))

    async def key_by_hash(self, key_hash: str) -> Row | None:
        rows = await self._fetch("SELECT * FROM keys WHERE key_hash = $1", key_hash)
        return _from_pg(rows[0]) if rows else None

    async def key_by_id(self, key_id: str) -> Row | None:
        rows = await self._fetch("SELECT * FROM keys WHERE key_id = $1", key_id)
        return _from_pg(rows[0]) if rows else None

    async def list_keys(self) -> list[Row]:
        return [_from_pg(r) for r in await self._fetch("SELECT * FROM keys ORDER BY created_at")]

    async def update_key(self, key_id: str, fields: Row) -> None:
        cols = [f for f in fields if f in UPDATABLE_KEY_FIELDS]
        sets = ", ".join(f"{quoted((c,))} = ${i + 1}" for i, c in enumerate(cols))
        await self._execute(f"UPDATE keys SET {sets} WHERE key_id = ${len(cols) + 1}",
                            *(fields[f] for f in cols), key_id)

    async def list_budgets(self) -> list[Row]:
        rows = await self._fetch("SELECT id, body::text AS body, updated_at FROM budgets ORDER BY id")
        return [_from_pg(r) for r in rows]

    async def put_budget(self, budget_id: str, body: str | None, at: datetime) -> None:
        await self._execute(
            "INSERT INTO budgets (id, body, updated_at) VALUES ($1, $2::jsonb, $3) ON CONFLICT (id) DO UPDATE SET "
            "body = excluded.body, updated_at = excluded.updated_at", budget_id, body, at)

    async def revoke_key(self, key_id: str, at: datetime) -> bool:
        status = await self._execute(
            "UPDATE keys SET revoked_at = $1 WHERE key_id = $2 AND revoked_at IS NULL", at, key_id
        )
        return status.endswith(" 1")

    # -- outcomes, alerts and incremental reads (analytics) -----------------------------------------
    async def insert_outcome(self, row: Row) -> bool:
        args = ", ".join(f"${i + 1}" + ("::jsonb" if f == "metadata" else "") for i, f in enumerate(OUTCOME_FIELDS))
        status = await self._execute(
            f"INSERT INTO outcomes ({quoted(OUTCOME_FIELDS)}) VALUES ({args}) ON CONFLICT (outcome_id) DO NOTHING",
            *(_outcome_to_pg(f, row.get(f)) for f in OUTCOME_FIELDS))
        return status.endswith(" 1")

    async def fetch_outcomes(self, since: datetime | None = None, until: datetime | None = None) -> list[Row]:
        rows = await self._fetch(
            f"SELECT {quoted(OUTCOME_FIELDS)} FROM outcomes "
            "WHERE ($1::timestamptz IS NULL OR ts >= $1) AND ($2::timestamptz IS NULL OR ts < $2) "
            "ORDER BY ts, outcome_id", since, until)
        return [_from_pg(r) for r in rows]

    async def sync_watermark(self, table: SyncTable) -> int:
        # Transactions below the oldest running one have all ended: nothing can commit there later.
        _check_table(table)
        return int((await self._fetch("SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint"))[0][0])

    async def fetch_page(self, table: SyncTable, from_pos: int, after: tuple[int, str] | None,
                         limit: int) -> list[Row]:
        _check_table(table)
        key, fields = SYNC_KEYS[table], EVENT_FIELDS if table == "events" else OUTCOME_FIELDS
        # Keyset paging on (xid, id): one transaction holds a whole batch of rows.
        a_pos, a_key = after or (from_pos, _NIL_UUID if table == "events" else "")
        rows = await self._fetch(
            f"SELECT ingest_xid::text::bigint AS _pos, {quoted(fields)} FROM {table} "
            f"WHERE ingest_xid >= $1::text::xid8 AND (ingest_xid, {key}::text) > ($2::text::xid8, $3) "
            f"ORDER BY ingest_xid, {key}::text LIMIT $4",
            str(from_pos), str(a_pos), a_key, limit)
        return [_from_pg(r) for r in rows]

    async def claim_alert(self, alert_id: str, kind: str, body: str, at: datetime) -> bool:
        status = await self._execute(
            "INSERT INTO alerts (alert_id, kind, body, created_at) VALUES ($1, $2, $3::jsonb, $4) "
            "ON CONFLICT (alert_id) DO NOTHING", alert_id, kind, body, at)
        return status.endswith(" 1")


_NIL_UUID = "00000000-0000-0000-0000-000000000000"


def _check_table(table: str) -> None:
    if table not in SYNC_KEYS:  # the name goes into SQL text
        raise ValueError(f"unknown sync table {table!r}")


def _outcome_to_pg(field: str, value: Any) -> Any:
    if value is None:
        return None
    if field == "value_usd":
        return Decimal(value)
    if field in ("ts", "received_at"):
        return datetime.fromisoformat(value) if isinstance(value, str) else value
    return value
