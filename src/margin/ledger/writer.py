"""Batched async ledger writer: requests hand it events and never wait for the database.

One task owns the store: it drains a bounded queue in batches; when the store fails it spools
the batch to disk (fsync) and keeps spooling until a retry succeeds, then replays the spool.
Because that one task does both writing and replay, no row can slip between a replay and a
new live spool file. Nothing is dropped: a full queue spools inline, a clean shutdown drains.

A process killed outright (SIGKILL, OOM killer) loses its memory, queue included. So each row
is also written to a journal file as it is queued: a plain write(2), no fsync, which costs a few
microseconds and survives the death of the process (the kernel owns the page cache), though not
of the machine. Journal segments are deleted once their rows are stored or spooled; at start a
writer moves the segments of dead writers (their flock is free) into the spool, and the spool's
idempotent replay does the rest.

A call in flight when the process dies has no event yet, though the provider may bill it. So just
before a call goes upstream the gateway journals a provisional row for it (`begin`: status 500,
`replica_lost`, the estimated input cost), which only the journal holds; the call's real row, when
it comes, is journaled after it under the same event id. Recovery keeps the last row per event id,
so a finished call replays as itself and a call cut by the death replays as the provisional row:
no call that reached a provider is missing from the ledger. While a provisional row is open, the
segments holding it are kept."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import orjson

from margin.domain import Event
from margin.ledger.schema import Row, event_to_row
from margin.ledger.spool import Spool
from margin.ledger.store import Store

log = logging.getLogger("margin.ledger")


class Journal:
    """Write-ahead copies of queued rows, in segments `journal-<owner>-<n>.jsonl` beside the spool,
    guarded by `journal-<owner>.lock` (flock held for the writer's life)."""

    SEGMENT_ROWS = 4096
    OPEN_MAX_S = 3600.0  # a provisional row older than this is let go (no call runs that long)

    def __init__(self, directory: Path):
        self.dir = directory
        self.owner = f"{os.getpid()}-{secrets.token_hex(4)}"
        self._lock_path = directory / f"journal-{self.owner}.lock"
        self._lock_fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self.seq = 0  # rows written so far
        self.errors = 0
        self._n = 0
        self._rows = 0  # rows in the open segment
        self._sealed: list[tuple[int, Path]] = []  # (last seq in it, path)
        self._path = self._segment(0)
        self._fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._open: dict[str, tuple[int, float]] = {}  # event id -> (seq, monotonic time) of its provisional row

    def _segment(self, n: int) -> Path:
        return self.dir / f"journal-{self.owner}-{n:06d}.jsonl"

    def write(self, row: Row) -> int:
        self.seq += 1
        try:
            os.write(self._fd, orjson.dumps(row) + b"\n")
        except OSError:  # disk full: the row still goes on through the queue; only the net is gone
            self.errors += 1
        self._rows += 1
        if self._rows >= self.SEGMENT_ROWS:
            os.close(self._fd)
            self._sealed.append((self.seq, self._path))
            self._n += 1
            self._rows = 0
            self._path = self._segment(self._n)
            self._fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        return self.seq

    def begin(self, row: Row) -> None:
        """A provisional row for a call going upstream: journal-only, kept until `end(event_id)`."""
        self._open[str(row["event_id"])] = (self.write(row), time.monotonic())

    def end(self, event_id: str) -> None:
        """The call's own row is journaled (after the provisional one): the provisional may go."""
        self._open.pop(event_id, None)

    def _keep_from(self) -> int | None:
        """The oldest seq still needed by an open provisional row."""
        if not self._open:
            return None
        too_old = time.monotonic() - self.OPEN_MAX_S
        for k in [k for k, (_, t) in self._open.items() if t < too_old]:
            del self._open[k]
        return min((q for q, _ in self._open.values()), default=None)

    def handled(self, seq: int) -> None:
        """Every row up to `seq` is in the store or the spool: drop the segments holding only those
        (never one an open provisional row is in)."""
        keep = self._keep_from()
        if keep is not None:
            seq = min(seq, keep - 1)
        while self._sealed and self._sealed[0][0] <= seq:
            with contextlib.suppress(OSError):
                self._sealed.pop(0)[1].unlink()
        if seq >= self.seq and self._rows:
            os.ftruncate(self._fd, 0)  # O_APPEND: the next write lands at the new end
            self._rows = 0

    def close(self) -> None:
        """After a clean drain: nothing in the journal is still needed."""
        self.handled(self.seq)
        os.close(self._fd)
        with contextlib.suppress(OSError):
            self._path.unlink()
        self._lock_path.unlink(missing_ok=True)
        os.close(self._lock_fd)

    @staticmethod
    def recover(directory: Path, spool: Spool, own: str = "") -> int:
        """Move the rows of writers that died (SIGKILL) into the spool; returns how many."""
        moved = 0
        owners = {p.name.removeprefix("journal-").removesuffix(".lock") for p in directory.glob("journal-*.lock")}
        owners |= {p.name.removeprefix("journal-").rsplit("-", 1)[0] for p in directory.glob("journal-*.jsonl")}
        for owner in sorted(owners - {own}):
            lock = directory / f"journal-{owner}.lock"
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a live writer (another process sharing this directory)
                segments = sorted(directory.glob(f"journal-{owner}-*.jsonl"))
                last: dict[str, Row] = {}  # the newest row per event id: a call's own row over its provisional
                for seg in segments:
                    for rows in Spool.read(seg):
                        for row in rows:
                            last.pop(str(row.get("event_id")), None)
                            last[str(row.get("event_id"))] = row
                rows = list(last.values())
                for i in range(0, len(rows), 1000):
                    spool.append(rows[i:i + 1000])  # fsync'd before the segments go
                moved += len(rows)
                for seg in segments:
                    seg.unlink()
                lock.unlink(missing_ok=True)
            finally:
                os.close(fd)
        return moved


def _latest(row: Row, event: Event) -> Row:
    if event.actions:
        row["actions"] = orjson.dumps(event.actions).decode()
    return row


@dataclass
class WriterStats:
    written: int = 0
    spooled: int = 0
    replayed: int = 0
    rejected: int = 0
    overflowed: int = 0
    recovered: int = 0  # rows found in the journals of killed writers at start
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
        journal: bool = True,
    ):
        self.store = store
        self.spool = spool
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.retry_interval_s = retry_interval_s
        self.stats = WriterStats()
        self._q: asyncio.Queue[tuple[int, Row, Event] | None] = asyncio.Queue(maxsize=queue_size)
        self._journal_on = journal
        self.journal: Journal | None = None
        self._pending_seq = 0  # highest journal seq among rows not yet stored or spooled
        self._task: asyncio.Task[None] | None = None
        self._down = False
        self._dirty = False  # rows went to the spool while the store was up (queue overflow)
        self._unsaved: list[Row] = []  # rows neither the store nor the disk took yet: retried
        self._next_retry = 0.0
        self._idle = asyncio.Event()

    # -- producer side (hot path) -------------------------------------------------------------
    def append(self, event: Event) -> None:
        # The row is taken now (the journal needs it); only `actions` may still grow afterwards
        # (settlement notes an overrun), so the writer refreshes that one field when it writes.
        row = event_to_row(event)
        if self.journal is not None:  # the call's own row is journaled or spooled below
            self.journal.end(event.event_id)  # so its provisional row may go
        if self._q.full():
            # Overload: the request pays an fsync rather than the ledger losing a row.
            self.stats.overflowed += 1
            self._dirty = True
            try:
                self.spool.append([row])
                self.stats.spooled += 1
            except OSError:
                self._unsaved.append(row)
            return
        seq = self.journal.write(row) if self.journal is not None else 0
        self._q.put_nowait((seq, row, event))

    def begin(self, provisional: Event) -> None:
        """Journal what a call in flight would leave in the ledger if this process died before it
        ends (see the module docstring); nothing reaches the store unless that happens."""
        if self.journal is not None:
            try:
                self.journal.begin(event_to_row(provisional))
            except OSError:
                self.journal.errors += 1

    @property
    def queued(self) -> int:
        return self._q.qsize()

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        if self._journal_on and self.journal is None:
            self.stats.recovered = await asyncio.to_thread(Journal.recover, self.spool.dir, self.spool)
            if self.stats.recovered:
                log.warning("ledger: %d events from a killed writer's journal moved to the spool for replay",
                            self.stats.recovered)
            self.journal = Journal(self.spool.dir)
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
        if self.journal is not None and not self._unsaved:
            self.journal.close()
            self.journal = None

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
            if batch:
                self._pending_seq = max(self._pending_seq, batch[-1][0])
            rows = self._unsaved + [_latest(r, e) for _, r, e in batch]
            self._unsaved = []
            try:
                if (self._down or self._dirty) and time.monotonic() >= self._next_retry:
                    await self._recover()
                if rows:
                    await self._write(rows)
                if self.journal is not None:
                    self.journal.handled(self._pending_seq)
                if stopping and self._q.empty() and (self._down or self._dirty):
                    await self._recover()
            except Exception as e:
                # Neither store nor disk would take the rows (e.g. disk full): keep them in memory
                # and try again; the task must never die, or everything after would be lost.
                self._unsaved = rows + self._unsaved
                log.error("ledger writer: could not store or spool %d rows, retrying: %s", len(self._unsaved), e)
                await asyncio.sleep(self.retry_interval_s)
                if not stopping:
                    continue
            if stopping and self._q.empty():
                if self._unsaved:
                    log.error("ledger writer: %d rows could not be saved at shutdown", len(self._unsaved))
                self._idle.set()
                return

    async def _next_batch(self, stopping: bool) -> tuple[list[tuple[int, Row, Event]], bool]:
        batch: list[tuple[int, Row, Event]] = []
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
