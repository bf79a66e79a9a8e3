"""The ledger event as a row, and versioned migrations for SQLite and PostgreSQL.

Rows are plain dicts of JSON-able values (Decimal as str, time as ISO-8601 UTC) so the same row
can go to either store or to the disk spool and back without loss."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

import orjson

from margin.domain import Event, usd
from margin.ledger.audit import AUDIT_POSTGRES, AUDIT_SQLITE
from margin.ledger.jobs_schema import JOBS_POSTGRES, JOBS_SQLITE

Row = dict[str, Any]

# (name, sqlite type, postgres type). Money is TEXT in SQLite (exact), NUMERIC in PostgreSQL.
EVENT_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("event_id", "TEXT PRIMARY KEY", "UUID PRIMARY KEY"),
    ("ts_start", "TEXT NOT NULL", "TIMESTAMPTZ NOT NULL"),
    ("ts_end", "TEXT NOT NULL", "TIMESTAMPTZ NOT NULL"),
    ("request_id", "TEXT", "TEXT"),
    ("parent_event_id", "TEXT", "TEXT"),
    ("run_id", "TEXT", "TEXT"),
    ("step", "TEXT", "TEXT"),
    ("workflow", "TEXT", "TEXT"),
    ("agent", "TEXT", "TEXT"),
    ("tool", "TEXT", "TEXT"),
    ("org", "TEXT", "TEXT"),
    ("team", "TEXT", "TEXT"),
    ("user", "TEXT", "TEXT"),
    ("key_id", "TEXT", "TEXT"),
    ("app", "TEXT", "TEXT"),
    ("env", "TEXT", "TEXT"),
    ("tags", "TEXT", "JSONB"),
    ("endpoint", "TEXT", "TEXT"),
    ("requested_model", "TEXT", "TEXT"),
    ("model", "TEXT", "TEXT"),
    ("provider", "TEXT", "TEXT"),
    ("tier", "TEXT", "TEXT"),
    ("route_reason", "TEXT", "TEXT"),
    ("stream", "INTEGER", "BOOLEAN"),
    ("input_tokens", "INTEGER", "INTEGER"),
    ("cached_input_tokens", "INTEGER", "INTEGER"),
    ("cache_write_tokens", "INTEGER", "INTEGER"),
    ("output_tokens", "INTEGER", "INTEGER"),
    ("reasoning_tokens", "INTEGER", "INTEGER"),
    ("usage_source", "TEXT", "TEXT"),
    ("cost_usd", "TEXT", "NUMERIC"),
    ("cost_input_usd", "TEXT", "NUMERIC"),
    ("cost_output_usd", "TEXT", "NUMERIC"),
    ("cost_cache_read_usd", "TEXT", "NUMERIC"),
    ("cost_cache_write_usd", "TEXT", "NUMERIC"),
    ("price_source", "TEXT", "TEXT"),
    ("lever", "TEXT", "TEXT"),
    ("avoided_cost_usd", "TEXT", "NUMERIC"),
    ("tokens_saved", "INTEGER", "INTEGER"),
    ("cache_hit", "TEXT", "TEXT"),
    ("latency_ms", "REAL", "DOUBLE PRECISION"),
    ("ttft_ms", "REAL", "DOUBLE PRECISION"),
    ("tpot_ms", "REAL", "DOUBLE PRECISION"),
    ("status", "INTEGER", "INTEGER"),
    ("error_type", "TEXT", "TEXT"),
    ("energy_j", "REAL", "DOUBLE PRECISION"),
    ("actions", "TEXT", "JSONB"),
)
# Added by later migrations (the first migration keeps creating the table it always created).
EVENT_COLUMNS_V1 = EVENT_COLUMNS
EVENT_COLUMNS = (*EVENT_COLUMNS_V1,
                 ("tool_calls", "INTEGER", "INTEGER"))  # migration 6: tool calls the model's answer issued
EVENT_FIELDS: tuple[str, ...] = tuple(c[0] for c in EVENT_COLUMNS)
MONEY_FIELDS = frozenset(
    {"cost_usd", "cost_input_usd", "cost_output_usd", "cost_cache_read_usd", "cost_cache_write_usd",
     "avoided_cost_usd"}
)
TIME_FIELDS = frozenset({"ts_start", "ts_end"})
JSON_FIELDS = frozenset({"tags", "actions"})

KEY_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("key_id", "TEXT PRIMARY KEY", "TEXT PRIMARY KEY"),
    ("key_hash", "TEXT NOT NULL UNIQUE", "TEXT NOT NULL UNIQUE"),
    ("prefix", "TEXT NOT NULL", "TEXT NOT NULL"),
    ("name", "TEXT", "TEXT"),
    ("org", "TEXT", "TEXT"),
    ("team", "TEXT", "TEXT"),
    ("user", "TEXT", "TEXT"),
    ("app", "TEXT", "TEXT"),
    ("env", "TEXT", "TEXT"),
    ("models", "TEXT", "TEXT"),
    ("tags", "TEXT", "TEXT"),
    ("created_at", "TEXT NOT NULL", "TIMESTAMPTZ NOT NULL"),
    ("revoked_at", "TEXT", "TIMESTAMPTZ"),
)
KEY_FIELDS: tuple[str, ...] = tuple(c[0] for c in KEY_COLUMNS)

# One row per reported outcome of a run (POST /v1/outcomes). `ts` is when it happened (client
# may say), `received_at` when margin stored it; outcomes may arrive late and several per run.
OUTCOME_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("outcome_id", "TEXT PRIMARY KEY", "TEXT PRIMARY KEY"),
    ("run_id", "TEXT NOT NULL", "TEXT NOT NULL"),
    ("workflow", "TEXT", "TEXT"),
    ("status", "TEXT NOT NULL", "TEXT NOT NULL"),
    ("value_usd", "TEXT", "NUMERIC"),
    ("quality", "REAL", "DOUBLE PRECISION"),
    ("human_minutes", "REAL", "DOUBLE PRECISION"),
    ("ts", "TEXT NOT NULL", "TIMESTAMPTZ NOT NULL"),
    ("received_at", "TEXT NOT NULL", "TIMESTAMPTZ NOT NULL"),
    ("metadata", "TEXT", "JSONB"),
)
OUTCOME_FIELDS: tuple[str, ...] = tuple(c[0] for c in OUTCOME_COLUMNS)
# Alerts that must fire once across replicas and restarts: the primary key is the claim.
ALERT_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("alert_id", "TEXT PRIMARY KEY", "TEXT PRIMARY KEY"),
    ("kind", "TEXT NOT NULL", "TEXT NOT NULL"),
    ("body", "TEXT", "JSONB"),
    ("created_at", "TEXT NOT NULL", "TIMESTAMPTZ NOT NULL"),
)
UPDATABLE_KEY_FIELDS = frozenset({"name", "org", "team", "user", "app", "env", "models", "tags"})


def _q(name: str) -> str:
    return f'"{name}"'  # `user` is reserved in PostgreSQL


def _table(name: str, cols: tuple[tuple[str, str, str], ...], dialect: int) -> str:
    body = ", ".join(f"{_q(c[0])} {c[dialect]}" for c in cols)
    return f"CREATE TABLE IF NOT EXISTS {name} ({body})"


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sqlite: tuple[str, ...]
    postgres: tuple[str, ...]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "events and keys",
        (
            _table("events", EVENT_COLUMNS_V1, 1),
            "CREATE INDEX IF NOT EXISTS events_ts ON events (ts_start)",
            "CREATE INDEX IF NOT EXISTS events_run ON events (run_id)",
            _table("keys", KEY_COLUMNS, 1),
        ),
        (
            _table("events", EVENT_COLUMNS_V1, 2),
            "CREATE INDEX IF NOT EXISTS events_ts ON events (ts_start)",
            "CREATE INDEX IF NOT EXISTS events_run ON events (run_id)",
            _table("keys", KEY_COLUMNS, 2),
        ),
    ),
    # Budgets edited live (admin API / CLI). body NULL is a tombstone: a budget from margin.yaml
    # that an administrator deleted stays deleted.
    Migration(
        2,
        "budgets",
        ("CREATE TABLE IF NOT EXISTS budgets (id TEXT PRIMARY KEY, body TEXT, updated_at TEXT NOT NULL)",),
        ("CREATE TABLE IF NOT EXISTS budgets (id TEXT PRIMARY KEY, body JSONB, updated_at TIMESTAMPTZ NOT NULL)",),
    ),
    # Outcomes of agent runs, and alerts fired once (anomalies). The analytics warehouse copies
    # rows incrementally by commit position: SQLite's rowid (one writer, so rowids grow in commit
    # order); in PostgreSQL the inserting transaction id (`ingest_xid`), read up to the oldest
    # still-running transaction, because replicas commit out of order.
    Migration(
        3,
        "outcomes, alerts, analytics sync position",
        (
            _table("outcomes", OUTCOME_COLUMNS, 1),
            "CREATE INDEX IF NOT EXISTS outcomes_run ON outcomes (run_id)",
            "CREATE INDEX IF NOT EXISTS outcomes_ts ON outcomes (ts)",
            _table("alerts", ALERT_COLUMNS, 1),
        ),
        (
            _table("outcomes", OUTCOME_COLUMNS, 2),
            "CREATE INDEX IF NOT EXISTS outcomes_run ON outcomes (run_id)",
            "CREATE INDEX IF NOT EXISTS outcomes_ts ON outcomes (ts)",
            "ALTER TABLE outcomes ADD COLUMN IF NOT EXISTS ingest_xid xid8 DEFAULT pg_current_xact_id()",
            "CREATE INDEX IF NOT EXISTS outcomes_xid ON outcomes (ingest_xid)",
            _table("alerts", ALERT_COLUMNS, 2),
            # Nullable on purpose: the writer's staging table copies this shape (LIKE events).
            "ALTER TABLE events ADD COLUMN IF NOT EXISTS ingest_xid xid8 DEFAULT pg_current_xact_id()",
            "CREATE INDEX IF NOT EXISTS events_xid ON events (ingest_xid)",
        ),
    ),
    # The batch lane: files, batches, items (and deferred requests), provider batches; the SQL
    # that reads and writes them is in ledger/jobs.py.
    Migration(4, "batch lane", JOBS_SQLITE, JOBS_POSTGRES),
    # Prompts and completions of keys that opted in (tag log_payloads=true), secrets redacted
    # (gateway/payloads.py). One row per ledger event; replay and distillation export read it.
    Migration(
        5,
        "payloads",
        ("CREATE TABLE IF NOT EXISTS payloads (event_id TEXT PRIMARY KEY, request TEXT, response TEXT, "
         "ts TEXT NOT NULL)", "CREATE INDEX IF NOT EXISTS payloads_ts ON payloads (ts)"),
        ("CREATE TABLE IF NOT EXISTS payloads (event_id UUID PRIMARY KEY, request JSONB, response JSONB, "
         "ts TIMESTAMPTZ NOT NULL)", "CREATE INDEX IF NOT EXISTS payloads_ts ON payloads (ts)"),
    ),
    # Tool calls an answer asked the client to run: run caps count them, reports show them per run.
    Migration(6, "events.tool_calls", ("ALTER TABLE events ADD COLUMN tool_calls INTEGER",),
              ("ALTER TABLE events ADD COLUMN IF NOT EXISTS tool_calls INTEGER",)),
    # The audit log (issue 11): every change to keys, budgets and config, hash-chained, append-only
    # (triggers refuse UPDATE/DELETE); the SQL that appends and reads it is in ledger/audit.py.
    Migration(7, "audit log", AUDIT_SQLITE, AUDIT_POSTGRES),
)


def quoted(fields: tuple[str, ...]) -> str:
    return ", ".join(_q(f) for f in fields)


def _iso(t: datetime) -> str:
    return t.isoformat()


def event_to_row(e: Event) -> Row:
    a, u, c = e.attribution, e.usage, e.cost
    return {
        "event_id": e.event_id,
        "ts_start": _iso(e.ts_start),
        "ts_end": _iso(e.ts_end),
        "request_id": e.request_id,
        "parent_event_id": e.parent_event_id or None,
        "run_id": e.run_id or None,
        "step": e.step or None,
        "workflow": e.workflow or None,
        "agent": e.agent or None,
        "tool": e.tool or None,
        "org": a.org,
        "team": a.team,
        "user": a.user,
        "key_id": a.key_id,
        "app": a.app,
        "env": a.env,
        "tags": orjson.dumps(a.tag_map).decode(),
        "endpoint": e.endpoint,
        "requested_model": e.requested_model,
        "model": e.model,
        "provider": e.provider,
        "tier": e.tier,
        "route_reason": e.route_reason,
        "stream": int(e.stream),
        "input_tokens": u.input_tokens,
        "cached_input_tokens": u.cached_input_tokens,
        "cache_write_tokens": u.cache_write_tokens,
        "output_tokens": u.output_tokens,
        "reasoning_tokens": u.reasoning_tokens,
        "usage_source": u.source,
        "cost_usd": usd(c.total_usd),
        "cost_input_usd": usd(c.input_usd),
        "cost_output_usd": usd(c.output_usd),
        "cost_cache_read_usd": usd(c.cache_read_usd),
        "cost_cache_write_usd": usd(c.cache_write_usd),
        "price_source": c.price_source,
        "lever": e.lever or None,
        "avoided_cost_usd": usd(e.avoided_cost_usd),
        "tokens_saved": e.tokens_saved,
        "cache_hit": e.cache_hit or None,
        "latency_ms": e.latency_ms,
        "ttft_ms": e.ttft_ms,
        "tpot_ms": e.tpot_ms,
        "status": e.status,
        "error_type": e.error_type or None,
        "energy_j": e.energy_j,
        "actions": orjson.dumps(e.actions).decode(),
        "tool_calls": e.tool_calls,
    }


def money(value: Any) -> Decimal:
    return Decimal(str(value)) if value is not None else Decimal(0)
