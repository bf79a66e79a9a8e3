"""The analytics warehouse: a DuckDB copy of the ledger, kept up to date incrementally.

Why a copy and not DuckDB's sqlite/postgres scanners: the scanners are extensions DuckDB downloads
at run time (impossible offline); the PyPI wheels that carry them pin DuckDB 1.5.5, and a scan of
the ledger on every query is far slower than DuckDB's own columnar storage (docs/analytics.md has
the measurements). So `refresh()` reads new rows through margin's own store API by commit position
(`Store.sync_watermark` / `Store.fetch_page`) and inserts them, deduplicated by id:
- SQLite has one writer, so a later commit always has a larger rowid: read `rowid >= last`.
- PostgreSQL replicas commit out of order, so positions are transaction ids and each refresh reads
  again from the oldest transaction that was still running at the last refresh: a row committed
  late is never missed, a row read twice is ignored by the primary key.

Besides the copy, refresh keeps per-run aggregates (`runs`) and an hourly rollup (`hourly`, see
rollup.py) for the hours and runs that got new rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import numpy as np

from margin.analytics import derived, rollup
from margin.analytics.derived import budget_acts_of, savings_of
from margin.ledger.schema import EVENT_COLUMNS, MONEY_FIELDS, OUTCOME_FIELDS, TIME_FIELDS, Row
from margin.ledger.store import SYNC_KEYS, Store, SyncTable, open_store

MONEY = "DECIMAL(38, 24)"  # 14 integer digits, 24 decimals: a nano-cent is 1e-11
PAGE = 50_000
SCHEMA_VERSION = "6"  # 5: events.tool_calls; 6: hourly rollup, budget_acts (built from events when a 5 opens)


def _duck_type(name: str, sqlite_type: str) -> str:
    if name in MONEY_FIELDS:
        return MONEY
    if name in TIME_FIELDS:
        return "TIMESTAMP"  # naive UTC: no time-zone arithmetic in the hot queries
    base = sqlite_type.split()[0]
    return {"INTEGER": "BIGINT", "REAL": "DOUBLE"}.get(base, "VARCHAR")


EVENT_TYPES: dict[str, str] = {c[0]: _duck_type(c[0], c[1]) for c in EVENT_COLUMNS}
OUTCOME_TYPES: dict[str, str] = {
    "outcome_id": "VARCHAR", "run_id": "VARCHAR", "workflow": "VARCHAR", "status": "VARCHAR",
    "value_usd": MONEY, "quality": "DOUBLE", "human_minutes": "DOUBLE", "ts": "TIMESTAMP",
    "received_at": "TIMESTAMP", "metadata": "VARCHAR",
}


def _q(name: str) -> str:
    return f'"{name}"'


def _ddl(table: str, types: dict[str, str], key: str) -> str:
    cols = ", ".join(f"{_q(n)} {t}{' PRIMARY KEY' if n == key else ''}" for n, t in types.items())
    return f"CREATE TABLE IF NOT EXISTS {table} ({cols})"


_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (k VARCHAR PRIMARY KEY, v VARCHAR)",
    # No primary key on events: DuckDB's index made bulk copies 2-3x slower; refresh dedupes by
    # an anti-join on event_id instead (one writer, under a lock).
    _ddl("events", EVENT_TYPES, ""),
    _ddl("outcomes", OUTCOME_TYPES, "outcome_id"),
    *derived.DDL,  # savings per lever, budget actions: parsed from `actions` once, at copy time
    # Per (run, team) aggregates, rebuilt at refresh for the runs that got new calls: the outcome
    # and run pages group ~100k runs instead of a million calls.
    "CREATE TABLE IF NOT EXISTS runs (run_id VARCHAR, team VARCHAR, started TIMESTAMP, ended TIMESTAMP, "
    "ev_workflow VARCHAR, cost DECIMAL(38, 24), calls BIGINT, tokens BIGINT, tool_calls BIGINT, caps_hit BIGINT, "
    "errors BIGINT)",
    # The outcome that counts per run (rebuilt at refresh when outcomes arrive, see _RUN_OUTCOME).
    "CREATE TABLE IF NOT EXISTS run_outcome AS SELECT * FROM outcomes WHERE FALSE",
    rollup.DDL,
)
# The latest outcome by ts, then by arrival (see outcomes.counted): a table, not a view, so the
# outcome pages do not sort every outcome on every query.
_RUN_OUTCOME = (
    "CREATE OR REPLACE TABLE run_outcome AS SELECT * EXCLUDE (rn) FROM (SELECT *, row_number() OVER "
    "(PARTITION BY run_id ORDER BY ts DESC, received_at DESC, outcome_id DESC) AS rn FROM outcomes) WHERE rn = 1"
)


def _cast(name: str, typ: str) -> str:
    col = _q(name)
    if typ == "TIMESTAMP":
        return f"timezone('UTC', CAST({col} AS TIMESTAMPTZ))"
    if typ == MONEY:
        return f"CAST({col} AS {MONEY})"
    return f"CAST({col} AS {typ})"


def _insert_sql(table: str, types: dict[str, str]) -> str:
    cols = ", ".join(_q(n) for n in types)
    exprs = ", ".join(_cast(n, t) for n, t in types.items())
    if table == "events":
        # Rows read twice are dropped by id. A copy of a page row has that row's id and ts_start, so
        # only stored rows with id >= the page's smallest id AND ts_start >= its earliest can be one:
        # ids are UUIDv7 (time-ordered) and rows arrive roughly in time order, so DuckDB's zone maps
        # skip all but the newest row groups (ts_start covers ids that are not time-ordered, such as
        # the batch lane's uuid5). Both bounds are parameters: ?, ? = min(id), min(ts_start) of the page.
        return (f"INSERT INTO events ({cols}) SELECT {exprs} FROM page WHERE event_id NOT IN "
                "(SELECT event_id FROM events WHERE event_id >= ? AND ts_start >= ?)")
    return f"INSERT INTO {table} ({cols}) SELECT {exprs} FROM page ON CONFLICT DO NOTHING"


_INSERTS = {"events": _insert_sql("events", EVENT_TYPES), "outcomes": _insert_sql("outcomes", OUTCOME_TYPES)}
_TYPES = {"events": EVENT_TYPES, "outcomes": OUTCOME_TYPES}


def _text_money(v: Any) -> Any:
    return None if v is None else str(v)


@dataclass
class SyncStats:
    events: int = 0
    outcomes: int = 0
    pages: int = 0
    rebuilt: bool = False
    seconds: float = 0.0
    positions: dict[str, int] = field(default_factory=dict)


class Warehouse:
    """`Warehouse(ledger_url)` keeps an in-memory copy; give `path` to keep a DuckDB file between
    runs (only new rows are read on the next refresh). One process may open a file at a time."""

    def __init__(self, ledger_url: str, path: str | Path | None = None, page_size: int = PAGE,
                 threads: int | None = None):
        self.ledger_url = ledger_url
        self.path = str(path) if path else ":memory:"
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self.page_size = page_size
        self.con = duckdb.connect(self.path)
        self.con.execute("SET TimeZone = 'UTC'")
        if threads:
            self.con.execute(f"SET threads = {int(threads)}")
        self._refreshing = threading.Lock()  # one refresh at a time; queries use their own cursors
        self._touched: set[str] = set()  # runs with new calls since their aggregates were built
        self._hours: set[datetime] = set()  # hours (naive UTC) with new calls since the rollup was built
        self.con.execute(_SCHEMA[0])  # meta first: it says whether the rest is ours
        known = self._meta("ledger_url"), self._meta("schema")
        upgrade = known == (ledger_url, "5")  # only the rollup is new: build it from the copy
        if known != (None, None) and known != (ledger_url, SCHEMA_VERSION) and not upgrade:
            self._reset()  # another ledger (or layout): start over rather than mix two ledgers
        for stmt in _SCHEMA:
            self.con.execute(stmt)
        if upgrade:
            self._rebuild(self.con, {r[0] for r in self.con.execute(
                "SELECT DISTINCT date_trunc('hour', ts_start) FROM events").fetchall()}, set(), False)
            self._derive(self.con, self.con.execute(
                "SELECT event_id, actions FROM events WHERE actions LIKE '%\"downgrade\"%' "
                "OR actions LIKE '%\"block\"%' OR actions LIKE '%\"defer\"%'").fetchall(), "", datetime.min)
        self._set_meta("ledger_url", ledger_url)
        self._set_meta("schema", SCHEMA_VERSION)

    # -- plumbing -------------------------------------------------------------------------------
    def _meta(self, k: str) -> str | None:
        r = self.con.execute("SELECT v FROM meta WHERE k = ?", [k]).fetchall()
        return str(r[0][0]) if r else None

    def _set_meta(self, k: str, v: str, cur: duckdb.DuckDBPyConnection | None = None) -> None:
        (cur or self.con).execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", [k, v])

    def _reset(self) -> None:
        for kind in ("VIEW", "TABLE"):  # run_outcome was a view in an earlier layout
            with contextlib.suppress(duckdb.CatalogException):
                self.con.execute(f"DROP {kind} IF EXISTS run_outcome")
        for t in ("events", "outcomes", "savings", "budget_acts", "runs", rollup.TABLE, "meta"):
            self.con.execute(f"DROP TABLE IF EXISTS {t}")
        self.con.execute(_SCHEMA[0])

    def cursor(self) -> duckdb.DuckDBPyConnection:
        """A cursor for one query (DuckDB cursors may run in parallel threads)."""
        return self.con.cursor()

    def query(self, sql: str, params: list[Any] | None = None) -> list[dict[str, Any]]:
        cur = self.cursor()
        try:
            res = cur.execute(sql, params or [])
            names = [d[0] for d in res.description or []]
            return [dict(zip(names, r, strict=True)) for r in res.fetchall()]
        finally:
            cur.close()

    def close(self) -> None:
        self.con.close()

    # -- sync -----------------------------------------------------------------------------------
    async def refresh(self, store: Store | None = None) -> SyncStats:
        """Copy rows committed since the last refresh (events, outcomes). Safe to call often.

        One refresh at a time, in one DuckDB transaction (a bulk copy commits after each full page):
        a page sees the new events, their rollup hours and run aggregates together or not at all,
        and a refresh of a few new rows commits once."""
        t0 = asyncio.get_running_loop().time()
        own = store is None
        st = store or open_store(self.ledger_url)
        stats = SyncStats()
        while not self._refreshing.acquire(blocking=False):  # not a blocking wait: the loop keeps serving
            await asyncio.sleep(0.005)
        cur = self.con.cursor()
        try:
            if own:
                await st.open()
            cur.execute("BEGIN TRANSACTION")
            for table in ("events", "outcomes"):
                await self._sync_table(st, cur, table, stats)
            hours, runs = set(self._hours), set(self._touched)
            if hours or runs or stats.outcomes:
                await asyncio.to_thread(self._rebuild, cur, hours, runs, bool(stats.outcomes))
            cur.execute("COMMIT")
            self._hours -= hours  # only once committed: a failed refresh rebuilds them next time
            self._touched -= runs
        except BaseException:
            with contextlib.suppress(duckdb.Error):
                cur.execute("ROLLBACK")
            raise
        finally:
            cur.close()
            self._refreshing.release()
            if own:
                await st.close()
        stats.seconds = asyncio.get_running_loop().time() - t0
        return stats

    def refresh_blocking(self) -> SyncStats:
        return asyncio.run(self.refresh())

    async def _sync_table(self, store: Store, cur: duckdb.DuckDBPyConnection, table: SyncTable,
                          stats: SyncStats) -> None:
        pos_key = f"pos:{table}"
        from_pos = int(self._meta(pos_key) or 0)
        watermark = await store.sync_watermark(table)
        if watermark < from_pos:
            # Positions went back: the SQLite file was replaced or VACUUM renumbered rowids.
            # Re-read everything; the primary keys drop what we already have.
            from_pos, stats.rebuilt = 0, True
        after: tuple[int, str] | None = None
        key = SYNC_KEYS[table]
        while True:
            rows = await store.fetch_page(table, from_pos, after, self.page_size)
            if not rows:
                break
            n = await asyncio.to_thread(self._ingest, cur, table, rows)
            setattr(stats, table, getattr(stats, table) + n)
            stats.pages += 1
            after = (int(rows[-1]["_pos"]), str(rows[-1][key]))
            if len(rows) < self.page_size:
                break
            cur.execute("COMMIT")  # a bulk copy: keep transactions to a page (the position moves at the end)
            cur.execute("BEGIN TRANSACTION")
        if max(from_pos, watermark) != from_pos or stats.rebuilt:  # a write costs a WAL entry: only on change
            self._set_meta(pos_key, str(max(from_pos, watermark)), cur)
        stats.positions[table] = max(from_pos, watermark)

    def _ingest(self, cur: duckdb.DuckDBPyConnection, table: SyncTable, rows: list[Row]) -> int:
        types = _TYPES[table]
        # Transpose with zip (C speed); stores give every row the same keys in the same order.
        names = list(rows[0])
        cols = dict(zip(names, zip(*(r.values() for r in rows), strict=True), strict=True))
        page = {n: np.array([_text_money(v) for v in cols[n]] if t == MONEY else cols[n], dtype=object)
                for n, t in types.items()}
        cur.register("page", page)
        if table != "events":
            added = int(_scalar(cur, _INSERTS[table]))  # DuckDB answers an INSERT with the rows it added
            cur.unregister("page")
            return added
        ts = _cast("ts_start", "TIMESTAMP")
        # the page's de-duplication bounds, and its hours (new rows or not: rebuilding an hour again is harmless)
        lo_id, lo_ts, hours = cur.execute(
            f"SELECT min(event_id), min({ts}), list(DISTINCT date_trunc('hour', {ts})) FROM page").fetchall()[0]
        added = int(_scalar(cur, _INSERTS[table], [lo_id, lo_ts]))
        self._hours.update(hours)
        cur.unregister("page")
        self._touched.update(r for r in cols.get("run_id", ()) if r)
        self._derive(cur, [(r["event_id"], r.get("actions"), r.get("lever"), r.get("avoided_cost_usd"),
                            r.get("tokens_saved")) for r in rows if r.get("lever") or r.get("actions")], lo_id, lo_ts)
        return added

    @staticmethod
    def _derive(cur: duckdb.DuckDBPyConnection, rows: list[tuple[Any, ...]], lo_id: str, lo_ts: datetime) -> None:
        """savings and budget_acts rows of events just copied ((event_id, actions[, lever, avoided,
        tokens saved]) each); ids >= lo_id and ts_start >= lo_ts, as in the de-duplication."""
        names = ("event_id", "actions", "lever", "avoided_cost_usd", "tokens_saved")
        dicts = [dict(zip(names, r, strict=False)) for r in rows]
        for table, of in (("savings", savings_of), ("budget_acts", budget_acts_of)):
            found: list[tuple[Any, ...]] = [x for d in dicts for x in of(d)]
            if found:
                cols = zip(derived.INSERTS[table][0], zip(*found, strict=True), strict=True)
                cur.register("derived", {n: np.array(c, dtype=object) for n, c in cols})
                cur.execute(derived.insert_sql(table), [lo_id, lo_ts])
                cur.unregister("derived")

    @staticmethod
    def _rebuild(cur: duckdb.DuckDBPyConnection, hours: set[datetime], runs: set[str], outcomes: bool) -> None:
        """The rollup hours and run aggregates that got new events, and the counted outcomes."""
        if runs:
            cur.register("touched", {"run_id": np.array(sorted(runs), dtype=object)})
            cur.execute("DELETE FROM runs WHERE run_id IN (SELECT run_id FROM touched)")
            cur.execute(
                "INSERT INTO runs SELECT run_id, coalesce(team, ''), min(ts_start), max(ts_end), max(workflow), "
                "sum(cost_usd), count(*), sum(coalesce(input_tokens, 0) + coalesce(output_tokens, 0)), "
                "sum(coalesce(tool_calls, 0)), "
                "count(*) FILTER (WHERE error_type = 'run_limit_exceeded'), count(*) FILTER (WHERE status >= 400) "
                "FROM events WHERE run_id IN (SELECT run_id FROM touched) GROUP BY 1, 2")
            cur.unregister("touched")
        if hours:
            ordered = sorted(hours)
            cur.register("touched", {"h": np.array(ordered, dtype="datetime64[us]")})
            cur.execute(rollup.REBUILD[0])
            cur.execute(rollup.REBUILD[1], [ordered[0], ordered[-1] + rollup.HOUR])
            cur.unregister("touched")
        if outcomes:
            cur.execute(_RUN_OUTCOME)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in ("events", "outcomes", "savings", "budget_acts", rollup.TABLE):
            out[t] = int(_scalar(self.con, f"SELECT count(*) FROM {t}"))
        return out


def _scalar(cur: duckdb.DuckDBPyConnection, sql: str, params: list[Any] | None = None) -> Any:
    rows = cur.execute(sql, params or []).fetchall()  # fetch it all: DuckDB wants results finished
    return rows[0][0] if rows else None


def utc_naive(t: datetime) -> datetime:
    """The warehouse stores naive UTC timestamps; convert a filter bound to match."""
    return t.astimezone(UTC).replace(tzinfo=None) if t.tzinfo else t


__all__ = ["OUTCOME_FIELDS", "SyncStats", "Warehouse", "budget_acts_of", "savings_of", "utc_naive"]
