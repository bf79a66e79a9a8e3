"""What a ledger store must do, and which one a URL names."""

from __future__ import annotations

from datetime import datetime
from typing import Literal, Protocol

from margin.ledger.schema import Row

SyncTable = Literal["events", "outcomes"]
SYNC_KEYS: dict[str, str] = {"events": "event_id", "outcomes": "outcome_id"}


class StoreUnavailable(Exception):
    """The store cannot be reached or written right now (the writer spools and retries)."""


class Store(Protocol):
    url: str

    async def open(self) -> None:
        """Connect and apply pending migrations."""

    async def close(self) -> None: ...

    async def write_events(self, rows: list[Row]) -> None:
        """Insert rows; rows whose event_id is already stored are ignored (idempotent replay)."""

    def is_data_error(self, e: BaseException) -> bool:
        """True if `e` means the rows themselves are unacceptable (not that the store is down)."""

    async def count_events(self) -> int: ...

    async def fetch_events(self, since: datetime | None = None, until: datetime | None = None,
                           run_id: str | None = None, runs_only: bool = False) -> list[Row]:
        """Rows as JSON-able values (money as str, time as ISO text), oldest first; only one run's
        (`run_id`), or only calls that belong to a run (`runs_only`)."""

    async def fetch_payloads(self, since: datetime | None = None) -> dict[str, Row]:
        """Logged prompts and answers (keys that opted in) by event id: {"request": ..., "response": ...}."""

    async def insert_key(self, row: Row) -> None: ...

    async def key_by_hash(self, key_hash: str) -> Row | None: ...

    async def key_by_id(self, key_id: str) -> Row | None: ...

    async def list_keys(self) -> list[Row]: ...

    async def revoke_key(self, key_id: str, at: datetime) -> bool: ...

    async def update_key(self, key_id: str, fields: Row) -> None:
        """Set attribution / models / tags columns (never the hash) of an existing key."""

    async def schema_version(self) -> int: ...

    async def list_budgets(self) -> list[Row]:
        """Rows {id, body (JSON text or None for a deleted budget), updated_at}."""

    async def put_budget(self, budget_id: str, body: str | None, at: datetime) -> None: ...

    # -- outcomes, alerts and incremental reads (analytics) -----------------------------------------
    async def insert_outcome(self, row: Row) -> bool:
        """Store one outcome row (see schema.OUTCOME_FIELDS); False if its outcome_id is already stored."""

    async def fetch_outcomes(self, since: datetime | None = None, until: datetime | None = None) -> list[Row]:
        """Outcome rows with `since <= ts < until`, oldest first (money as str, time as ISO text)."""

    async def sync_watermark(self, table: SyncTable) -> int:
        """A commit position P such that every row of `table` committed later has `_pos >= P`."""

    async def fetch_page(self, table: SyncTable, from_pos: int, after: tuple[int, str] | None,
                         limit: int) -> list[Row]:
        """Rows with `_pos >= from_pos`, ordered by (`_pos`, id), strictly after `after`; each row
        carries its commit position in `_pos`. Positions are never reused for a later commit."""

    async def claim_alert(self, alert_id: str, kind: str, body: str, at: datetime) -> bool:
        """Record an alert; True only for the first claim of `alert_id` (across replicas)."""


def open_store(url: str) -> Store:
    """`sqlite:///relative.db`, `sqlite:////abs/path.db`, `sqlite://:memory:` or `postgresql://...`."""
    if url.startswith("sqlite:"):
        from margin.ledger.sqlite import SQLiteStore

        return SQLiteStore(url)
    if url.startswith(("postgresql://", "postgres://")):
        from margin.ledger.postgres import PostgresStore

        return PostgresStore(url)
    raise ValueError(f"unsupported ledger url {url!r}: use sqlite:///file.db or postgresql://...")
