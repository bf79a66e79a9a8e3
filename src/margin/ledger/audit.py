"""The audit log: every change to keys, budgets and configuration as an append-only, hash-chained
record in the ledger database (SQLite or PostgreSQL, same URL; migration 7).

A record is `(seq, ts, actor, action, target, before, after, address, prev_hash, hash)`. `before`
and `after` are canonical JSON text (sorted keys) and `ts` ISO-8601 UTC text, stored as TEXT in both
dialects, so the bytes that were hashed are the bytes that are read back. `hash` is SHA-256 over the
previous record's hash and this record's canonical JSON (every field but `hash`): altering,
deleting or reordering a record breaks the chain from there on (`verify`). Only a rewrite of the
whole tail is invisible to the chain itself, which is why `verify` also takes anchors (a (seq, hash)
pair kept elsewhere, e.g. the gateway's log line of each append).

Appends are serialised, so concurrent replicas never fork the chain: SQLite by `BEGIN IMMEDIATE`
(one writer at a time, across processes), PostgreSQL by a transaction-scoped advisory lock; `seq`
is also the primary key, so a second record with the same number could not be stored anyway.
Triggers refuse UPDATE and DELETE (and TRUNCATE in PostgreSQL): an accident cannot rewrite history,
and whoever drops the triggers on purpose is caught by `verify`.

The SQL runs through ledger/jobs_db.py (the batch lane's two-dialect runner): `?` placeholders."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

GENESIS = "0" * 64  # prev_hash of record 1
FIELDS = ("seq", "ts", "actor", "action", "target", "before", "after", "address", "prev_hash", "hash")
HASHED = FIELDS[:-1]
_LOCK = 0x61756474  # "audt": one appender at a time across PostgreSQL replicas
_COLS = ", ".join(f'"{f}"' for f in FIELDS)  # before/after are keywords in both dialects: quoted

MAX_SEQ = 2**63 - 1  # record numbers are 64-bit in both stores; a query past that is refused, not sent
_TABLE = ('CREATE TABLE IF NOT EXISTS audit_log (seq {seq} PRIMARY KEY, ts TEXT NOT NULL, actor TEXT NOT NULL, '
          'action TEXT NOT NULL, target TEXT NOT NULL, "before" TEXT, "after" TEXT, address TEXT, '
          'prev_hash TEXT NOT NULL, hash TEXT NOT NULL)')
_INDEXES = ("CREATE INDEX IF NOT EXISTS audit_ts ON audit_log (ts)",
            "CREATE INDEX IF NOT EXISTS audit_target ON audit_log (target)")
AUDIT_SQLITE: tuple[str, ...] = (
    _TABLE.format(seq="INTEGER"), *_INDEXES,
    "CREATE TRIGGER IF NOT EXISTS audit_log_no_update BEFORE UPDATE ON audit_log "
    "BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END",
    "CREATE TRIGGER IF NOT EXISTS audit_log_no_delete BEFORE DELETE ON audit_log "
    "BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END",
)
AUDIT_POSTGRES: tuple[str, ...] = (
    _TABLE.format(seq="BIGINT"), *_INDEXES,
    "CREATE OR REPLACE FUNCTION margin_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS "
    "$$ BEGIN RAISE EXCEPTION 'audit_log is append-only: % refused', TG_OP; END $$",
    "CREATE TRIGGER audit_log_no_change BEFORE UPDATE OR DELETE ON audit_log "
    "FOR EACH ROW EXECUTE FUNCTION margin_audit_append_only()",
    "CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log "
    "FOR EACH STATEMENT EXECUTE FUNCTION margin_audit_append_only()",
)

Record = dict[str, Any]


# -- the chain (pure) ---------------------------------------------------------------------------------

def json_text(value: Any) -> str | None:
    """A before/after value as canonical JSON text (None stays NULL). Decimals become strings."""
    if value is None:
        return None
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS, default=str).decode()


def canonical(rec: Mapping[str, Any]) -> bytes:
    """The bytes a record's hash covers: every field but `hash`, as stored (text stays text)."""
    return orjson.dumps({f: rec.get(f) for f in HASHED}, option=orjson.OPT_SORT_KEYS)


def chain_hash(prev_hash: str, rec: Mapping[str, Any]) -> str:
    return hashlib.sha256(prev_hash.encode() + b"\n" + canonical(rec)).hexdigest()


def ts_text(t: datetime) -> str:
    """How `ts` is stored (and compared, as text): ISO-8601 UTC with microseconds."""
    return t.astimezone(UTC).isoformat(timespec="microseconds")


def make_record(seq: int, ts: datetime, prev_hash: str, actor: str, action: str, target: str,
                before: Any, after: Any, address: str | None) -> Record:
    rec: Record = {"seq": seq, "ts": ts_text(ts), "actor": actor,
                   "action": action, "target": target, "before": json_text(before), "after": json_text(after),
                   "address": address, "prev_hash": prev_hash}
    rec["hash"] = chain_hash(prev_hash, rec)
    return rec


@dataclass(frozen=True)
class Verdict:
    ok: bool
    records: int                 # records checked
    head_seq: int                # the last good record (0: none)
    head_hash: str               # its hash (GENESIS: none)
    bad_seq: int | None = None   # the first record that fails
    reason: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "records": self.records, "head_seq": self.head_seq, "head_hash": self.head_hash,
                "bad_seq": self.bad_seq, "reason": self.reason}


class Checker:
    """Verifies records fed in ascending seq order; stops at the first failure."""

    def __init__(self, anchors: Mapping[int, str] | None = None):
        self.anchors = dict(anchors or {})
        self.prev_seq, self.prev_hash, self.count = 0, GENESIS, 0
        self.bad: tuple[int, str] | None = None

    def feed(self, rec: Mapping[str, Any]) -> bool:
        if self.bad is not None:
            return False
        seq = int(rec["seq"])
        want = self.prev_seq + 1
        if seq != want:
            self.bad = (want, f"record {want} is missing (the next stored record is {seq}): records were deleted"
                        if seq > want else f"record {seq} is out of order (expected {want})")
        elif rec.get("prev_hash") != self.prev_hash:
            self.bad = (seq, f"record {seq}: prev_hash does not match the hash of record {self.prev_seq}: "
                             f"record {self.prev_seq} was rewritten or the chain was spliced")
        elif chain_hash(self.prev_hash, rec) != rec.get("hash"):
            self.bad = (seq, f"record {seq}: its contents do not match its hash (changed after it was written)")
        elif seq in self.anchors and self.anchors[seq] != rec.get("hash"):
            self.bad = (seq, f"record {seq}: hash differs from the anchor {self.anchors[seq][:16]}...: the chain "
                             "was rewritten from here on")
        if self.bad is not None:
            return False
        self.prev_seq, self.prev_hash = seq, str(rec["hash"])
        self.count += 1
        return True

    def verdict(self) -> Verdict:
        if self.bad is None:
            missing = sorted(s for s in self.anchors if s > self.prev_seq)
            if missing:
                s = missing[0]
                self.bad = (s, f"record {s} is missing: the anchor names it but the chain ends at record "
                               f"{self.prev_seq} (the tail was deleted)")
        if self.bad is not None:
            return Verdict(False, self.count, self.prev_seq, self.prev_hash, self.bad[0], self.bad[1])
        return Verdict(True, self.count, self.prev_seq, self.prev_hash)


def verify(records: Iterable[Mapping[str, Any]], anchors: Mapping[int, str] | None = None) -> Verdict:
    c = Checker(anchors)
    for r in records:
        if not c.feed(r):
            break
    return c.verdict()


def decoded(rec: Mapping[str, Any]) -> Record:
    """A record for people and APIs: before/after as JSON values rather than text."""
    out: Record = {f: rec.get(f) for f in FIELDS}
    for f in ("before", "after"):
        out[f] = orjson.loads(out[f]) if out[f] is not None else None
    out["seq"] = int(rec["seq"])
    return out


# -- the table ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Query:
    since: str | None = None         # ISO-8601 UTC text (ts compares as text in both dialects)
    until: str | None = None
    target: str | None = None
    action: str | None = None        # exact, or a prefix ending in "." or "*" ("key." / "key.*")
    actor: str | None = None
    before_seq: int | None = None    # paging, newest first
    limit: int = 100


class AuditLog:
    def __init__(self, url: str, pool_size: int = 2):
        from margin.ledger.jobs_db import PostgresDb, SqliteDb

        self.url = url
        self.postgres = url.startswith(("postgresql://", "postgres://"))
        self.db = PostgresDb(url, max_size=pool_size) if self.postgres else SqliteDb(url)

    async def open(self) -> None:
        await self.db.open()  # migrates the ledger first (version 7 creates audit_log)

    async def close(self) -> None:
        await self.db.close()

    async def append(self, actor: str, action: str, target: str, before: Any, after: Any,
                     address: str | None, now: datetime | None = None) -> Record:
        """Add one record at the head of the chain, atomically; returns it (with seq and hash)."""
        async with self.db.tx() as t:
            if self.postgres:
                await t.execute("SELECT pg_advisory_xact_lock(?)", _LOCK)
            head = await t.fetch("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1")
            seq, prev = (int(head[0]["seq"]) + 1, str(head[0]["hash"])) if head else (1, GENESIS)
            rec = make_record(seq, now or datetime.now(UTC), prev, actor, action, target, before, after, address)
            await t.execute(f"INSERT INTO audit_log ({_COLS}) VALUES ({', '.join('?' * len(FIELDS))})",
                            *(rec[f] for f in FIELDS))
        return rec

    async def head(self) -> tuple[int, str]:
        rows = await self.db.fetch("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1")
        return (int(rows[0]["seq"]), str(rows[0]["hash"])) if rows else (0, GENESIS)

    async def query(self, q: Query) -> list[Record]:
        """Stored records matching `q`, newest first."""
        where, args = ["1 = 1"], []
        for col, op, val in (("ts", ">=", q.since), ("ts", "<", q.until), ("target", "=", q.target),
                             ("actor", "=", q.actor), ("seq", "<", q.before_seq)):
            if val is not None:
                where.append(f"{col} {op} ?")
                args.append(val)
        if q.action and q.action.endswith(("*", ".")):  # a prefix: "key." or "key.*"
            where.append("action LIKE ? ESCAPE '\\'")
            args.append(q.action.rstrip("*").replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%")
        elif q.action:
            where.append("action = ?")
            args.append(q.action)
        return await self.db.fetch(f"SELECT {_COLS} FROM audit_log WHERE {' AND '.join(where)} "
                                   "ORDER BY seq DESC LIMIT ?", *args, q.limit)

    async def last(self, target: str, actions: tuple[str, ...]) -> Record | None:
        rows = await self.db.fetch(
            f"SELECT {_COLS} FROM audit_log WHERE target = ? AND action IN ({', '.join('?' * len(actions))}) "
            "ORDER BY seq DESC LIMIT 1", target, *actions)
        return rows[0] if rows else None

    async def scan(self, page: int = 5000) -> AsyncIterator[Record]:
        """Every record in seq order, a page at a time (verify and export stay in bounded memory)."""
        after = 0
        while True:
            rows = await self.db.fetch(f"SELECT {_COLS} FROM audit_log WHERE seq > ? ORDER BY seq LIMIT ?",
                                       after, page)
            for r in rows:
                yield r
            if len(rows) < page:
                return
            after = int(rows[-1]["seq"])

    async def verify(self, anchors: Mapping[int, str] | None = None) -> Verdict:
        c = Checker(anchors)
        async for r in self.scan():
            if not c.feed(r):
                break
        return c.verdict()
