"""Tables of the batch lane (migration 4): uploaded files, batches, their items (also deferred
single requests) and the batches margin forwarded to a provider's own batch API.

Times are epoch seconds (what the OpenAI batch API speaks), so the same SQL orders and compares
them in SQLite and PostgreSQL; money is TEXT in SQLite and NUMERIC in PostgreSQL, as in events."""

from __future__ import annotations

Column = tuple[str, str, str]  # (name, sqlite type, postgres type)

FILE_COLUMNS: tuple[Column, ...] = (
    ("file_id", "TEXT PRIMARY KEY", "TEXT PRIMARY KEY"),
    ("key_id", "TEXT NOT NULL", "TEXT NOT NULL"),
    ("purpose", "TEXT NOT NULL", "TEXT NOT NULL"),  # batch | batch_output
    ("filename", "TEXT NOT NULL", "TEXT NOT NULL"),
    ("bytes", "INTEGER NOT NULL", "BIGINT NOT NULL"),
    ("lines", "INTEGER NOT NULL", "INTEGER NOT NULL"),
    ("created_at", "INTEGER NOT NULL", "BIGINT NOT NULL"),
    ("batch_id", "TEXT", "TEXT"),  # output and error files: the batch they belong to
    ("content", "BLOB NOT NULL", "BYTEA NOT NULL"),
)

BATCH_COLUMNS: tuple[Column, ...] = (
    ("batch_id", "TEXT PRIMARY KEY", "TEXT PRIMARY KEY"),
    ("key_id", "TEXT NOT NULL", "TEXT NOT NULL"),
    ("endpoint", "TEXT NOT NULL", "TEXT NOT NULL"),
    ("input_file_id", "TEXT NOT NULL", "TEXT NOT NULL"),
    ("completion_window", "TEXT NOT NULL", "TEXT NOT NULL"),
    ("status", "TEXT NOT NULL", "TEXT NOT NULL"),
    ("total", "INTEGER NOT NULL", "INTEGER NOT NULL"),
    ("created_at", "INTEGER NOT NULL", "BIGINT NOT NULL"),
    ("in_progress_at", "INTEGER", "BIGINT"),
    ("expires_at", "INTEGER NOT NULL", "BIGINT NOT NULL"),
    ("finalizing_at", "INTEGER", "BIGINT"),
    ("completed_at", "INTEGER", "BIGINT"),
    ("failed_at", "INTEGER", "BIGINT"),
    ("expired_at", "INTEGER", "BIGINT"),
    ("cancelling_at", "INTEGER", "BIGINT"),
    ("cancelled_at", "INTEGER", "BIGINT"),
    ("output_file_id", "TEXT", "TEXT"),
    ("error_file_id", "TEXT", "TEXT"),
    ("metadata", "TEXT", "TEXT"),
    ("headers", "TEXT", "TEXT"),  # the X-Margin-* headers of the create request, applied to every item
)

ITEM_COLUMNS: tuple[Column, ...] = (
    ("item_id", "TEXT PRIMARY KEY", "TEXT PRIMARY KEY"),
    ("batch_id", "TEXT", "TEXT"),  # NULL: a deferred single request
    ("line", "INTEGER NOT NULL", "INTEGER NOT NULL"),
    ("custom_id", "TEXT NOT NULL", "TEXT NOT NULL"),
    ("key_id", "TEXT NOT NULL", "TEXT NOT NULL"),
    ("endpoint", "TEXT NOT NULL", "TEXT NOT NULL"),
    ("model", "TEXT NOT NULL", "TEXT NOT NULL"),
    ("body", "TEXT NOT NULL", "TEXT NOT NULL"),
    ("headers", "TEXT NOT NULL", "TEXT NOT NULL"),
    # queued | running | forward (waits for a provider batch) | upstream (in one) | done | failed |
    # expired | cancelled
    ("status", "TEXT NOT NULL", "TEXT NOT NULL"),
    ("reason", "TEXT", "TEXT"),  # deferred requests: window | budget
    ("attempts", "INTEGER NOT NULL", "INTEGER NOT NULL"),  # runs that count towards max_attempts
    # Runs whose outcome was committed. A run's ledger event id derives from (item_id, runs), so
    # a run repeated after a crash (nothing committed) cannot record a second event.
    ("runs", "INTEGER NOT NULL", "INTEGER NOT NULL"),
    ("not_before", "REAL NOT NULL", "DOUBLE PRECISION NOT NULL"),
    ("expires_at", "REAL NOT NULL", "DOUBLE PRECISION NOT NULL"),
    ("lease_owner", "TEXT", "TEXT"),
    ("lease_until", "REAL", "DOUBLE PRECISION"),
    ("event_id", "TEXT", "TEXT"),  # the ledger event that answered (after the item is finished)
    ("request_id", "TEXT NOT NULL", "TEXT NOT NULL"),
    ("response_status", "INTEGER", "INTEGER"),
    ("response_request_id", "TEXT", "TEXT"),
    ("response_body", "TEXT", "TEXT"),
    ("error_code", "TEXT", "TEXT"),
    ("error_message", "TEXT", "TEXT"),
    ("cost_usd", "TEXT", "NUMERIC"),
    ("saved_usd", "TEXT", "NUMERIC"),
    ("upstream_id", "TEXT", "TEXT"),
    ("holds", "TEXT", "TEXT"),  # budget holds of a forwarded item, settled when its answer arrives
    ("created_at", "REAL NOT NULL", "DOUBLE PRECISION NOT NULL"),
    ("finished_at", "REAL", "DOUBLE PRECISION"),
)

UPSTREAM_COLUMNS: tuple[Column, ...] = (
    ("upstream_id", "TEXT PRIMARY KEY", "TEXT PRIMARY KEY"),
    ("provider", "TEXT NOT NULL", "TEXT NOT NULL"),
    ("batch_id", "TEXT NOT NULL", "TEXT NOT NULL"),
    ("status", "TEXT NOT NULL", "TEXT NOT NULL"),  # preparing | submitted | done
    ("provider_batch_id", "TEXT", "TEXT"),
    ("items", "INTEGER NOT NULL", "INTEGER NOT NULL"),
    ("created_at", "REAL NOT NULL", "DOUBLE PRECISION NOT NULL"),
    ("next_poll", "REAL NOT NULL", "DOUBLE PRECISION NOT NULL"),
    ("lease_owner", "TEXT", "TEXT"),
    ("lease_until", "REAL", "DOUBLE PRECISION"),
)

FILE_FIELDS = tuple(c[0] for c in FILE_COLUMNS)
BATCH_FIELDS = tuple(c[0] for c in BATCH_COLUMNS)
ITEM_FIELDS = tuple(c[0] for c in ITEM_COLUMNS)
UPSTREAM_FIELDS = tuple(c[0] for c in UPSTREAM_COLUMNS)
MONEY = frozenset({"cost_usd", "saved_usd"})


def _table(name: str, cols: tuple[Column, ...], dialect: int) -> str:
    return f"CREATE TABLE IF NOT EXISTS {name} ({', '.join(f'{c[0]} {c[dialect]}' for c in cols)})"


def _ddl(dialect: int) -> tuple[str, ...]:
    return (
        _table("batch_files", FILE_COLUMNS, dialect),
        "CREATE INDEX IF NOT EXISTS batch_files_key ON batch_files (key_id, file_id)",
        _table("batches", BATCH_COLUMNS, dialect),
        "CREATE INDEX IF NOT EXISTS batches_key ON batches (key_id, batch_id)",
        "CREATE INDEX IF NOT EXISTS batches_status ON batches (status)",
        _table("batch_items", ITEM_COLUMNS, dialect),
        "CREATE INDEX IF NOT EXISTS batch_items_todo ON batch_items (status, not_before)",
        "CREATE INDEX IF NOT EXISTS batch_items_batch ON batch_items (batch_id, status)",
        "CREATE INDEX IF NOT EXISTS batch_items_upstream ON batch_items (upstream_id)",
        _table("batch_upstreams", UPSTREAM_COLUMNS, dialect),
        "CREATE INDEX IF NOT EXISTS batch_upstreams_status ON batch_upstreams (status, next_poll)",
    )


JOBS_SQLITE = _ddl(1)
JOBS_POSTGRES = _ddl(2)
