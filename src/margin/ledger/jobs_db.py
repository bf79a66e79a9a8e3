"""Run the job store's SQL on SQLite or PostgreSQL: the same statements (`?` placeholders), one
transaction helper, and the few places the dialects differ (row locking, money, placeholders)."""

from __future__ import annotations

import asyncio
import contextlib
import re
import sqlite3
from collections.abc import AsyncIterator, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any, Protocol

from margin.ledger.jobs_schema import MONEY
from margin.ledger.schema import Row
from margin.ledger.sqlite import sqlite_path
from margin.ledger.store import StoreUnavailable, open_store

_MARK = re.compile(r"\?")


class Tx(Protocol):
    async def fetch(self, sql: str, *args: Any) -> list[Row]: ...

    async def execute(self, sql: str, *args: Any) -> int:
        """Rows affected."""

    async def executemany(self, sql: str, rows: Sequence[tuple[Any, ...]]) -> None: ...


class Db(Tx, Protocol):
    skip_locked: str  # appended to a claiming SELECT

    def param(self, field: str, value: Any) -> Any: ...

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    def tx(self) -> contextlib.AbstractAsyncContextManager[Tx]: ...


async def _migrate(url: str) -> None:
    """The ledger store owns migrations (version 4 creates the lane's tables): open it once."""
    store = open_store(url)
    try:
        await store.open()
    finally:
        await store.close()


class _SqliteTx:
    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    @staticmethod
    def _guard(fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except sqlite3.OperationalError as e:  # locked or unreadable: an outage, not a bug
            raise StoreUnavailable(f"sqlite: {e}") from e

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        def run() -> list[Row]:
            return [dict(r) for r in self.conn.execute(sql, args).fetchall()]

        rows: list[Row] = await asyncio.to_thread(self._guard, run)
        return rows

    async def execute(self, sql: str, *args: Any) -> int:
        return int(await asyncio.to_thread(self._guard, lambda: self.conn.execute(sql, args).rowcount))

    async def executemany(self, sql: str, rows: Sequence[tuple[Any, ...]]) -> None:
        await asyncio.to_thread(self._guard, lambda: self.conn.executemany(sql, rows))


class SqliteDb:
    """Its own connection to the ledger file (WAL: readers never block the event writer)."""

    skip_locked = ""  # BEGIN IMMEDIATE already makes a claim exclusive

    def __init__(self, url: str, busy_timeout_ms: int = 10_000):
        self.url, self.path, self._busy = url, sqlite_path(url), busy_timeout_ms
        self._conn: sqlite3.Connection | None = None
        self._lock = asyncio.Lock()  # one statement or transaction at a time on the connection

    def param(self, field: str, value: Any) -> Any:
        return str(value) if field in MONEY and isinstance(value, Decimal) else value

    async def open(self) -> None:
        if self._conn is not None:
            return
        await _migrate(self.url)

        def connect() -> sqlite3.Connection:
            if self.path != ":memory:":
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            c = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            c.row_factory = sqlite3.Row
            c.execute(f"PRAGMA busy_timeout={self._busy}")
            c.execute("PRAGMA journal_mode=WAL")
            c.execute("PRAGMA synchronous=NORMAL")
            return c

        try:
            self._conn = await asyncio.to_thread(connect)
        except sqlite3.OperationalError as e:
            raise StoreUnavailable(f"sqlite {self.path}: {e}") from e

    async def close(self) -> None:
        async with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def _c(self) -> _SqliteTx:
        if self._conn is None:
            raise StoreUnavailable("the batch lane's store is not open")
        return _SqliteTx(self._conn)

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        async with self._lock:
            return await self._c().fetch(sql, *args)

    async def execute(self, sql: str, *args: Any) -> int:
        async with self._lock:
            return await self._c().execute(sql, *args)

    async def executemany(self, sql: str, rows: Sequence[tuple[Any, ...]]) -> None:
        async with self._lock:
            await self._c().executemany(sql, rows)

    @contextlib.asynccontextmanager
    async def tx(self) -> AsyncIterator[Tx]:
        async with self._lock:
            t = self._c()
            await t.execute("BEGIN IMMEDIATE")
            try:
                yield t
            except BaseException:
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(t.conn.execute, "ROLLBACK")
                raise
            await t.execute("COMMIT")


def _pg_sql(sql: str) -> str:
    n = 0

    def number(_: re.Match[str]) -> str:
        nonlocal n
        n += 1
        return f"${n}"

    return _MARK.sub(number, sql)


def _pg_row(record: Any) -> Row:
    return {k: (str(v) if isinstance(v, Decimal) else v) for k, v in record.items()}


class _PgTx:
    def __init__(self, conn: Any, outage: tuple[type[BaseException], ...]):
        self.conn, self._outage = conn, outage

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        try:
            return [_pg_row(r) for r in await self.conn.fetch(_pg_sql(sql), *args)]
        except self._outage as e:
            raise StoreUnavailable(f"postgres: {e}") from e

    async def execute(self, sql: str, *args: Any) -> int:
        try:
            status: str = await self.conn.execute(_pg_sql(sql), *args)
        except self._outage as e:
            raise StoreUnavailable(f"postgres: {e}") from e
        last = status.rsplit(" ", 1)[-1]
        return int(last) if last.isdigit() else 0

    async def executemany(self, sql: str, rows: Sequence[tuple[Any, ...]]) -> None:
        try:
            await self.conn.executemany(_pg_sql(sql), rows)
        except self._outage as e:
            raise StoreUnavailable(f"postgres: {e}") from e


class PostgresDb:
    skip_locked = " FOR UPDATE SKIP LOCKED"  # replicas claim different items, never wait on each other

    def __init__(self, url: str, max_size: int = 4):
        import asyncpg

        self.url, self._max = url, max_size
        self._pool: Any = None
        self._outage: tuple[type[BaseException], ...] = (
            OSError, asyncpg.PostgresConnectionError, asyncpg.CannotConnectNowError, asyncpg.InterfaceError,
            asyncpg.exceptions.AdminShutdownError, TimeoutError)

    def param(self, field: str, value: Any) -> Any:
        if field in MONEY and value is not None:
            return Decimal(value)
        return value

    async def open(self) -> None:
        if self._pool is not None:
            return
        import asyncpg

        try:
            await _migrate(self.url)
            self._pool = await asyncpg.create_pool(self.url, min_size=1, max_size=self._max, timeout=5,
                                                   command_timeout=60)
        except self._outage as e:
            raise StoreUnavailable(f"postgres: {e}") from e

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    def _p(self) -> Any:
        if self._pool is None:
            raise StoreUnavailable("the batch lane's store is not open")
        return self._pool

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        async with self._p().acquire() as conn:
            return await _PgTx(conn, self._outage).fetch(sql, *args)

    async def execute(self, sql: str, *args: Any) -> int:
        async with self._p().acquire() as conn:
            return await _PgTx(conn, self._outage).execute(sql, *args)

    async def executemany(self, sql: str, rows: Sequence[tuple[Any, ...]]) -> None:
        async with self._p().acquire() as conn:
            await _PgTx(conn, self._outage).executemany(sql, rows)

    @contextlib.asynccontextmanager
    async def tx(self) -> AsyncIterator[Tx]:
        try:
            async with self._p().acquire() as conn, conn.transaction():
                yield _PgTx(conn, self._outage)
        except self._outage as e:
            raise StoreUnavailable(f"postgres: {e}") from e


def open_db(url: str) -> Db:
    if url.startswith("sqlite:"):
        return SqliteDb(url)
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresDb(url)
    raise ValueError(f"unsupported ledger url {url!r}: use sqlite:///file.db or postgresql://...")
