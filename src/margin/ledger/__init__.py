"""The ledger: event schema, migrations, SQLite and PostgreSQL stores, batched writer, disk spool."""

from margin.ledger.schema import EVENT_FIELDS, Row, event_to_row
from margin.ledger.spool import Spool
from margin.ledger.store import Store, StoreUnavailable, open_store
from margin.ledger.writer import LedgerWriter, WriterStats

__all__ = ["EVENT_FIELDS", "LedgerWriter", "Row", "Spool", "Store", "StoreUnavailable", "WriterStats",
           "event_to_row", "open_store"]
