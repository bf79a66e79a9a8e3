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
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import orjson

from margin.ledger.schema import EVENT_COLUMNS, MONEY_FIELDS, OUTCOME_FIELDS, TIME_FIELDS, Row
from margin.ledger.store import SYNC_KEYS, Store, SyncTable, open_store

MONEY = "DECIMAL(38, 24)"  # 14 integer digits, 24 decimals: a nano-cent is 1e-11
PAGE = 50_000
SCHEMA_VERSION = "5"  # 5: events.tool_calls


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
    # Money saved per lever, one row per (event, lever), from the event's `actions` "saved" entries.
    "CREATE TABLE IF NOT EXISTS savings (event_id VARCHAR, lever VARCHAR, usd DECIMAL(38, 24), tokens BIGINT, "
    "ts_start TIMESTAMP, team VARCHAR, PRIMARY KEY (event_id, lever))",
    # Per (run, team) aggregates, rebuilt at refresh for the runs that got new calls: the outcome
    # and run pages group ~100k runs instead of a million calls.
    "CREATE TABLE IF NOT EXISTS runs (run_id VARCHAR, team VARCHAR, started TIMESTAMP, ended TIMESTAMP, "
    "ev_workflow VARCHAR, cost DECIMAL(38, 24), calls BIGINT, tokens BIGINT, tool_calls BIGINT, caps_hit BIGINT, "
    "errors BIGINT)",
    # The outcome that counts per run (rebuilt at refresh when outcomes arrive, see _RUN_OUTCOME).
    "CREATE TABLE IF NOT EXISTS run_outcome AS SELECT * FROM outcomes WHERE FALSE",
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
        return (f"INSERT INTO events ({cols}) SELECT {exprs} FROM page "
                "WHERE event_id NOT IN (SELECT event_id FROM events)")
    return f"INSERT INTO {table} ({cols}) SELECT {exprs} FROM page ON CONFLICT DO NOTHING"


_INSERTS = {"events": _insert_sql("events", EVENT_TYPES), "outcomes": _insert_sql("outcomes", OUTCOME_TYPES)}
_TYPES = {"events": EVENT_TYPES, "outcomes": OUTCOME_TYPES}


def _text_money(v: Any) -> Any:
    return None if v is None else str(v)


def savings_of(row: Row) -> list[tuple[str, str, str, int]]:
    """(event_id, lever, usd, tokens) per lever an event saved money with. Levers append
    `{"action": "saved", "lever", "usd", "tokens"}` to `actions`; older events (cache hits) only
    have `lever` / `avoided_cost_usd` / `tokens_saved`."""
    actions = row.get("actions")
    out: dict[str, tuple[str, str, str, int]] = {}
    if actions and '"saved"' in actions:
        for a in orjson.loads(actions) if isinstance(actions, str) else actions:
            if isinstance(a, dict) and a.get("action") == "saved" and a.get("lever"):
                lever = str(a["lever"])
                prev = out.get(lever)
                usd_ = Decimal(str(a.get("usd") or 0)) + (Decimal(prev[2]) if prev else 0)
                tokens = int(a.get("tokens") or 0) + (prev[3] if prev else 0)
                out[lever] = (row["event_id"], lever, format(usd_, "f"), tokens)
    if not out and row.get("lever"):
        levers = [x.strip() for x in str(row["lever"]).split(",") if x.strip()]
        if levers:  # several levers but no breakdown: credit the first (documented)
            out[levers[0]] = (row["event_id"], levers[0], str(row.get("avoided_cost_usd") or "0"),
                              int(row.get("tokens_saved") or 0))
    return list(out.values())


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
        self._lock = threading.Lock()  # one refresh at a time; queries use their own cursors
        self._touched: set[str] = set()  # runs with new calls since their aggregates were built
        self.con.execute(_SCHEMA[0])  # meta first: it says whether the rest is ours
        known = self._meta("ledger_url"), self._meta("schema")
        if known != (None, None) and known != (ledger_url, SCHEMA_VERSION):
            self._reset()  # another ledger (or layout): start over rather than mix two ledgers
        for stmt in _SCHEMA:
            self.con.execute(stmt)
        self._set_meta("ledger_url", ledger_url)
        self._set_meta("schema", SCHEMA_VERSION)

    # -- plumbing -------------------------------------------------------------------------------
    def _meta(self, k: str) -> str | None:
        r = self.con.execute("SELECT v FROM meta WHERE k = ?", [k]).fetchall()
        return str(r[0][0]) if r else None

    def _set_meta(self, k: str, v: str) -> None:
        self.con.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", [k, v])

    def _reset(self) -> None:
        for kind in ("VIEW", "TABLE"):  # run_outcome was a view in an earlier layout
            with contextlib.suppress(duckdb.CatalogException):
                self.con.execute(f"DROP {kind} IF EXISTS run_outcome")
        for t in ("events", "outcomes", "savings", "runs", "meta"):
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
        """Copy rows committed since the last refresh (events, outcomes). Safe to call often."""
        t0 = asyncio.get_running_loop().time()
        own = store is None
        st = store or open_store(self.ledger_url)
        stats = SyncStats()
        try:
            if own:
                await st.open()
            for table in ("events", "outcomes"):
                await self._sync_table(st, table, stats)
            if self._touched:
                await asyncio.to_thread(self._rebuild_runs)
            if stats.outcomes:
                await asyncio.to_thread(self._rebuild_run_outcome)
        finally:
            if own:
                await st.close()
        stats.seconds = asyncio.get_running_loop().time() - t0
        return stats

    def refresh_blocking(self) -> SyncStats:
        return asyncio.run(self.refresh())

    async def _sync_table(self, store: Store, table: SyncTable, stats: SyncStats) -> None:
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
            n = await asyncio.to_thread(self._ingest, table, rows)
            setattr(stats, table, getattr(stats, table) + n)
            stats.pages += 1
            after = (int(rows[-1]["_pos"]), str(rows[-1][key]))
            if len(rows) < self.page_size:
                break
        self._set_meta(pos_key, str(max(from_pos, watermark)))
        stats.positions[table] = max(from_pos, watermark)

    def _ingest(self, table: SyncTable, rows: list[Row]) -> int:
        types = _TYPES[table]
        # Transpose with zip (C speed); stores give every row the same keys in the same order.
        names = list(rows[0])
        cols = dict(zip(names, zip(*(r.values() for r in rows), strict=True), strict=True))
        page = {n: np.array([_text_money(v) for v in cols[n]] if t == MONEY else cols[n], dtype=object)
                for n, t in types.items()}
        with self._lock:
            cur = self.con.cursor()
            try:
                before = _scalar(cur, f"SELECT count(*) FROM {table}")
                cur.register("page", page)
                cur.execute(_INSERTS[table])
                cur.unregister("page")
                if table == "events":
                    self._touched.update(r for r in cols.get("run_id", ()) if r)
                    saved = [s for r in rows if (r.get("lever") or r.get("actions")) for s in savings_of(r)]
                    if saved:
                        scols = list(zip(*saved, strict=True))
                        cur.register("saved", {n: np.array(c, dtype=object)
                                               for n, c in zip(("e", "l", "u", "t"), scols, strict=True)})
                        cur.execute(f"INSERT INTO savings SELECT s.e, s.l, CAST(s.u AS {MONEY}), CAST(s.t AS BIGINT), "
                                    "e.ts_start, e.team FROM saved s JOIN events e ON e.event_id = s.e "
                                    "ON CONFLICT DO NOTHING")
                        cur.unregister("saved")
                after = _scalar(cur, f"SELECT count(*) FROM {table}")
            finally:
                cur.close()
        return int(after) - int(before)

    def _rebuild_runs(self) -> None:
        with self._lock:
            touched, self._touched = self._touched, set()
            cur = self.con.cursor()
            try:
                cur.register("touched", {"run_id": np.array(sorted(touched), dtype=object)})
                cur.execute("DELETE FROM runs WHERE run_id IN (SELECT run_id FROM touched)")
                cur.execute(
                    "INSERT INTO runs SELECT run_id, coalesce(team, ''), min(ts_start), max(ts_end), max(workflow), "
                    "sum(cost_usd), count(*), sum(coalesce(input_tokens, 0) + coalesce(output_tokens, 0)), "
                    "sum(coalesce(tool_calls, 0)), "
                    "count(*) FILTER (WHERE error_type = 'run_limit_exceeded'), count(*) FILTER (WHERE status >= 400) "
                    "FROM events WHERE run_id IN (SELECT run_id FROM touched) GROUP BY 1, 2")
                cur.unregister("touched")
            finally:
                cur.close()

    def _rebuild_run_outcome(self) -> None:
        with self._lock:
            self.con.execute(_RUN_OUTCOME)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in ("events", "outcomes", "savings"):
            out[t] = int(_scalar(self.con, f"SELECT count(*) FROM {t}"))
        return out


def _scalar(cur: duckdb.DuckDBPyConnection, sql: str, params: list[Any] | None = None) -> Any:
    rows = cur.execute(sql, params or []).fetchall()  # fetch it all: DuckDB wants results finished
    return rows[0][0] if rows else None


def utc_naive(t: datetime) -> datetime:
    """The warehouse stores naive UTC timestamps; convert a filter bound to match."""
    return t.astimezone(UTC).replace(tzinfo=None) if t.tzinfo else t


__all__ = ["OUTCOME_FIELDS", "SyncStats", "Warehouse", "savings_of", "utc_naive"]
