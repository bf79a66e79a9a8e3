"""SQLite ledger (WAL): the embedded default. One connection, used from a worker thread so the
event loop never waits on disk."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from margin.ledger.schema import (
    EVENT_FIELDS,
    KEY_FIELDS,
    MIGRATIONS,
    OUTCOME_FIELDS,
    UPDATABLE_KEY_FIELDS,
    Row,
    quoted,
)
from margin.ledger.store import SYNC_KEYS, StoreUnavailable, SyncTable

_INSERT_EVENTS = (
    f"INSERT OR IGNORE INTO events ({quoted(EVENT_FIELDS)}) VALUES ({', '.join('?' * len(EVENT_FIELDS))})"
)


def sqlite_path(url: str) -> str:
    rest = url.removeprefix("sqlite:")
    if rest in ("//:memory:", ":memory:"):
        return ":memory:"
    return rest[3:] if rest.startswith("///") else rest  # sqlite:////abs/path keeps its leading /


class SQLiteStore:
    def __init__(self, url: str, busy_timeout_ms: int = 2000):
        self.url = url
        self.path = sqlite_path(url)
        self._busy_ms = busy_timeout_ms
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    # -- plumbing -------------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout={self._busy_ms}")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    def _run(self, fn: Any, *args: Any) -> Any:
        with self._lock:
            try:
                if self._conn is None:
                    conn = self._connect()
                    _migrate(conn)  # first use migrates, even if open() failed earlier
                    self._conn = conn
                return fn(self._conn, *args)
            except BaseException as e:
                # Whatever failed, never leave a transaction open: the next BEGIN would fail forever.
                if self._conn is not None and self._conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        self._conn.execute("ROLLBACK")
                if isinstance(e, sqlite3.OperationalError):
                    # Locked or unreadable database: an outage to ride out, not a bug.
                    raise StoreUnavailable(f"sqlite {self.path}: {e}") from e
                raise

    async def _call(self, fn: Any, *args: Any) -> Any:
        return await asyncio.to_thread(self._run, fn, *args)

    def is_data_error(self, e: BaseException) -> bool:
        return isinstance(e, sqlite3.IntegrityError | sqlite3.InterfaceError | OverflowError | ValueError | TypeError)

    # -- lifecycle ------------------------------------------------------------------------------
    async def open(self) -> None:
        await self._call(lambda c: None)  # connecting migrates

    async def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    async def schema_version(self) -> int:
        return int(await self._call(lambda c: c.execute("SELECT MAX(version) FROM schema_migrations").fetchone()[0]))

    # -- events ---------------------------------------------------------------------------------
    async def write_events(self, rows: list[Row]) -> None:
        def write(c: sqlite3.Connection) -> None:
            c.execute("BEGIN IMMEDIATE")
            c.executemany(_INSERT_EVENTS, [tuple(r.get(f) for f in EVENT_FIELDS) for r in rows])
            c.execute("COMMIT")

        await self._call(write)

    async def count_events(self) -> int:
        return int(await self._call(lambda c: c.execute("SELECT COUNT(*) FROM events").fetchone()[0]))

    async def fetch_events(self, since: datetime | None = None, until: datetime | None = None,
                           run_id: str | None = None, runs_only: bool = False) -> list[Row]:
        # ISO-8601 UTC strings sort as time does, so text comparison is a time comparison.
        lo = (since or datetime(1970, 1, 1, tzinfo=UTC)).isoformat()
        hi = (until or datetime(9999, 1, 1, tzinfo=UTC)).isoformat()
        where, args = "ts_start >= ? AND ts_start < ?", [lo, hi]
        if run_id is not None:
            where, args = where + " AND run_id = ?", [*args, run_id]
        elif runs_only:
            where += " AND run_id IS NOT NULL"

        def fetch(c: sqlite3.Connection) -> list[Row]:
            cur = c.execute(f"SELECT * FROM events WHERE {where} ORDER BY ts_start", args)
            return [dict(r) for r in cur.fetchall()]

        rows: list[Row] = await self._call(fetch)
        return rows

    async def fetch_payloads(self, since: datetime | None = None) -> dict[str, Row]:
        lo = (since or datetime(1970, 1, 1, tzinfo=UTC)).isoformat()
        rows = await self._call(lambda c: c.execute(
            "SELECT event_id, request, response FROM payloads WHERE ts >= ?", (lo,)).fetchall())
        return {str(e): {"request": orjson.loads(req or "null"), "response": orjson.loads(resp or "null")}
                for e, req, resp in rows}

    # -- keys -----------------------------------------------------------------------------------
    async def insert_key(self, row: Row) -> None:
        sql = f"INSERT INTO keys ({quoted(KEY_FIELDS)}) VALUES ({', '.join('?' * len(KEY_FIELDS))})"
        await self._call(lambda c: c.execute(sql, tuple(row.get(f) for f in KEY_FIELDS)))

    async def _one_key(self, column: str, value: str) -> Row | None:
        r = await self._call(lambda c: c.execute(f"SELECT * FROM keys WHERE {column} = ?", (value,)).fetchone())
        return dict(r) if r is not None else None

    async def key_by_hash(self, key_hash: str) -> Row | None:
        return await self._one_key("key_hash", key_hash)

    async def key_by_id(self, key_id: str) -> Row | None:
        return await self._one_key("key_id", key_id)

    async def list_keys(self) -> list[Row]:
        rows = await self._call(lambda c: c.execute("SELECT * FROM keys ORDER BY created_at").fetchall())
        return [dict(r) for r in rows]

    async def update_key(self, key_id: str, fields: Row) -> None:
        cols = [f for f in fields if f in UPDATABLE_KEY_FIELDS]
        sql = f"UPDATE keys SET {', '.join(f'{quoted((c,))} = ?' for c in cols)} WHERE key_id = ?"
        await self._call(lambda c: c.execute(sql, (*(fields[f] for f in cols), key_id)))

    async def list_budgets(self) -> list[Row]:
        rows = await self._call(lambda c: c.execute("SELECT * FROM budgets ORDER BY id").fetchall())
        return [dict(r) for r in rows]

    async def put_budget(self, budget_id: str, body: str | None, at: datetime) -> None:
        await self._call(lambda c: c.execute(
            "INSERT INTO budgets (id, body, updated_at) VALUES (?, ?, ?) ON CONFLICT (id) DO UPDATE SET "
            "body = excluded.body, updated_at = excluded.updated_at", (budget_id, body, at.isoformat())))

    async def revoke_key(self, key_id: str, at: datetime) -> bool:
        cur = await self._call(
            lambda c: c.execute(
                "UPDATE keys SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL", (at.isoformat(), key_id)
            )
        )
        return bool(cur.rowcount)

    # -- outcomes, alerts and incremental reads (analytics) -----------------------------------------
    async def insert_outcome(self, row: Row) -> bool:
        sql = (f"INSERT OR IGNORE INTO outcomes ({quoted(OUTCOME_FIELDS)}) "
               f"VALUES ({', '.join('?' * len(OUTCOME_FIELDS))})")
        cur = await self._call(lambda c: c.execute(sql, tuple(row.get(f) for f in OUTCOME_FIELDS)))
        return bool(cur.rowcount)

    async def fetch_outcomes(self, since: datetime | None = None, until: datetime | None = None) -> list[Row]:
        lo = (since or datetime(1970, 1, 1, tzinfo=UTC)).isoformat()
        hi = (until or datetime(9999, 1, 1, tzinfo=UTC)).isoformat()
        rows = await self._call(lambda c: c.execute(
            "SELECT * FROM outcomes WHERE ts >= ? AND ts < ? ORDER BY ts, outcome_id", (lo, hi)).fetchall())
        return [dict(r) for r in rows]

    async def sync_watermark(self, table: SyncTable) -> int:
        # One writer at a time: a later commit always gets a larger rowid than any row seen now.
        _check_table(table)
        r = await self._call(lambda c: c.execute(f"SELECT COALESCE(MAX(rowid), 0) + 1 FROM {table}").fetchone())
        return int(r[0])

    async def fetch_page(self, table: SyncTable, from_pos: int, after: tuple[int, str] | None,
                         limit: int) -> list[Row]:
        _check_table(table)
        lo = max(from_pos, after[0] + 1 if after else from_pos)  # rowid is unique: the id is no tie-break

        def page(c: sqlite3.Connection) -> list[Row]:
            cur = c.cursor()
            cur.row_factory = None  # plain tuples: a page can be 50,000 rows
            cur.execute(f"SELECT rowid AS _pos, * FROM {table} WHERE rowid >= ? ORDER BY rowid LIMIT ?", (lo, limit))
            names = [d[0] for d in cur.description]
            return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]

        rows: list[Row] = await self._call(page)
        return rows

    async def claim_alert(self, alert_id: str, kind: str, body: str, at: datetime) -> bool:
        cur = await self._call(lambda c: c.execute(
            "INSERT OR IGNORE INTO alerts (alert_id, kind, body, created_at) VALUES (?, ?, ?, ?)",
            (alert_id, kind, body, at.isoformat())))
        return bool(cur.rowcount)


def _check_table(table: str) -> None:
    if table not in SYNC_KEYS:  # the name goes into SQL text
        raise ValueError(f"unknown sync table {table!r}")


def _migrate(c: sqlite3.Connection) -> None:
    c.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, name TEXT, applied_at TEXT)"
    )
    done = {r[0] for r in c.execute("SELECT version FROM schema_migrations")}
    for m in MIGRATIONS:
        if m.version in done:
            continue
        c.execute("BEGIN IMMEDIATE")
        for stmt in m.sqlite:
            c.execute(stmt)
        c.execute(
            "INSERT INTO schema_migrations VALUES (?, ?, ?)", (m.version, m.name, datetime.now(UTC).isoformat())
        )
        c.execute("COMMIT")
