"""Batched async ledger writer: requests hand it events and never wait for the database.

One task owns the store: it drains a bounded queue in batches; when the store fails it spools
the batch to disk (fsync) and keeps spooling until a retry succeeds, then replays the spool.
Because that one task does both writing and replay, no row can slip between a replay and a
new live spool file. Nothing is dropped: a full queue spools inline, a clean shutdown drains."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from margin.domain import Event
from margin.ledger.schema import Row, event_to_row
from margin.ledger.spool import Spool
from margin.ledger.store import Store

log = logging.getLogger("margin.ledger")


@dataclass
class WriterStats:
    written: int = 0
    spooled: int = 0
    replayed: int = 0
    rejected: int = 0
    overflowed: int = 0
    store_up: bool = True


class LedgerWriter:
    def __init__(
        self,
        store: Store,
        spool: Spool,
        batch_size: int = 500,
        flush_interval_s: float = 0.05,
        queue_size: int = 20000,
        retry_interval_s: float = 1.0,
    ):
        self.store = store
        self.spool = spool
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.retry_interval_s = retry_interval_s
        self.stats = WriterStats()
        self._q: asyncio.Queue[Event | None] = asyncio.Queue(maxsize=queue_size)
        self._task: asyncio.Task[None] | None = None
        self._down = False
        self._dirty = False  # rows went to the spool while the store was up (queue overflow)
        self._unsaved: list[Row] = []  # rows neither the store nor the disk took yet: retried
        self._next_retry = 0.0
        self._idle = asyncio.Event()

    # -- producer side (hot path) -------------------------------------------------------------
    def append(self, event: Event) -> None:
        try:
            self._q.put_nowait(event)
        except asyncio.QueueFull:
            # Overload: the request pays an fsync rather than the ledger losing a row.
            self.stats.overflowed += 1
            self._dirty = True
            try:
                self.spool.append([event_to_row(event)])
                self.stats.spooled += 1
            except OSError:
                self._unsaved.append(event_to_row(event))

    @property
    def queued(self) -> int:
        return self._q.qsize()

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        if self.spool.count() > 0:  # left over from an outage or a crash: replay first
            self._down, self._next_retry = True, 0.0
            self.stats.store_up = False
        self._task = asyncio.create_task(self._run(), name="ledger-writer")

    async def close(self) -> None:
        """Drain everything queued, then stop. Rows the store cannot take stay in the spool."""
        if self._task is None:
            return
        if not self._task.done():
            try:
                self._q.put_nowait(None)
            except asyncio.QueueFull:
                await self._q.put(None)  # the writer is alive and draining: room will come
            await self._task
        self._task = None

    async def flush(self, timeout_s: float = 10.0) -> None:
        """Wait until every event appended so far has been written or spooled (for tests/CLI)."""
        deadline = time.monotonic() + timeout_s
        while (self._q.qsize() or not self._idle.is_set()) and time.monotonic() < deadline:
            await asyncio.sleep(0.005)

    # -- the one consumer -----------------------------------------------------------------------
    async def _run(self) -> None:
        stopping = False
        while True:
            self._idle.set()
            batch, stopping = await self._next_batch(stopping)
            self._idle.clear()
            try:
                if (self._down or self._dirty) and time.monotonic() >= self._next_retry:
                    await self._recover()
                rows = self._unsaved + [event_to_row(e) for e in batch]
                self._unsaved = []
                if rows:
                    await self._write(rows)
                if stopping and self._q.empty() and (self._down or self._dirty):
                    await self._recover()
            except Exception as e:
                # Neither store nor disk would take the rows (e.g. disk full): keep them in memory
                # and try again; the task must never die, or everything after would be lost.
                self._unsaved.extend(rows if "rows" in locals() else [])
                log.error("ledger writer: could not store or spool %d rows, retrying: %s", len(self._unsaved), e)
                await asyncio.sleep(self.retry_interval_s)
                if not stopping:
                    continue
            if stopping and self._q.empty():
                if self._unsaved:
                    log.error("ledger writer: %d rows could not be saved at shutdown", len(self._unsaved))
                self._idle.set()
                return

    async def _next_batch(self, stopping: bool) -> tuple[list[Event], bool]:
        batch: list[Event] = []
        if not stopping:
            timeout = self.retry_interval_s if self._down else None
            try:
                first = await asyncio.wait_for(self._q.get(), timeout)
            except TimeoutError:
                return batch, stopping
            if first is None:
                stopping = True
            else:
                batch.append(first)
                if self._q.qsize() < self.batch_size:
                    # Let a batch gather: one transaction per interval, not per request.
                    await asyncio.sleep(self.flush_interval_s)
        while len(batch) < self.batch_size:
            try:
                item = self._q.get_nowait()
            except asyncio.QueueEmpty:
                break
            if item is None:
                stopping = True
            else:
                batch.append(item)
        return batch, stopping

    async def _write(self, rows: list[Row]) -> None:
        if not self._down:
            try:
                await self.store.write_events(rows)
                self.stats.written += len(rows)
                return
            except Exception as e:  # any failure: keep the rows, find out later if they were bad
                self._mark_down(e)
        await asyncio.to_thread(self.spool.append, rows)
        self.stats.spooled += len(rows)

    def _mark_down(self, e: BaseException) -> None:
        if not self._down:
            log.warning("ledger store unavailable, spooling to %s: %s", self.spool.dir, e)
        self._down, self.stats.store_up = True, False
        self._next_retry = time.monotonic() + self.retry_interval_s

    async def _recover(self) -> None:
        """Replay every sealed spool file; on success the store is up again."""
        self._dirty = False
        try:
            for path in await asyncio.to_thread(self.spool.seal):
                chunks = Spool.read(path)
                while (chunk := await asyncio.to_thread(next, chunks, None)) is not None:
                    await self._replay_chunk(chunk)
                path.unlink()
        except Exception as e:
            self._mark_down(e)
            return
        if self._down:
            log.warning("ledger store is back; spool replayed")
        self._down, self.stats.store_up = False, True

    async def _replay_chunk(self, rows: list[Row]) -> None:
        try:
            await self.store.write_events(rows)
            self.stats.replayed += len(rows)
            return
        except Exception as e:
            # Only a data error (a value the schema refuses) is the rows' fault; anything else -
            # connection, read-only standby, disk full, auth - is an outage: keep the spool.
            if not self.store.is_data_error(e):
                raise
            if len(rows) == 1:
                # A row the store rejects on its own merits is set aside (fsync'd), never dropped.
                await asyncio.to_thread(self.spool.reject, rows[0])
                self.stats.rejected += 1
                log.error("ledger row rejected by the store, kept in rejected.jsonl: %s (%s)",
                          rows[0].get("event_id"), e)
                return
        for r in rows:  # isolate the bad row
            await self._replay_chunk([r])
