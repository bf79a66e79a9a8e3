"""Append-only disk spool: where ledger rows wait while the store is down.

Rows are JSON lines in `spool-<n>.jsonl`. Replay first renames the live file to `.replaying`,
so new rows go to a fresh file while old ones drain; a crash mid-replay leaves the renamed file
behind and it is replayed at the next start. Replay is idempotent because stores ignore event
ids they already hold."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import orjson

from margin.ledger.schema import Row


class Spool:
    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._live = self.dir / "spool-live.jsonl"

    def append(self, rows: list[Row]) -> None:
        """Durable before return (fsync): the caller forgets the rows once this returns."""
        self._append(self._live, b"".join(orjson.dumps(r) + b"\n" for r in rows))

    def reject(self, row: Row) -> None:
        """Keep a row the store refuses on its merits, for a person to look at."""
        self._append(self.dir / "rejected.jsonl", orjson.dumps(row) + b"\n")

    def _append(self, path: Path, data: bytes) -> None:
        with self._lock:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                size = os.fstat(fd).st_size
                if size and os.pread(fd, 1, size - 1) != b"\n":
                    data = b"\n" + data  # a torn line from a crash must not swallow the next row
                view = memoryview(data)
                while view:  # os.write may write less than asked (e.g. nearly full disk)
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)

    def pending_files(self) -> list[Path]:
        return sorted(self.dir.glob("spool-*.replaying"))

    def seal(self) -> list[Path]:
        """Move the live file aside for replay; returns every file awaiting replay."""
        with self._lock:
            if self._live.exists() and self._live.stat().st_size > 0:
                self._live.rename(self.dir / f"spool-{time.time_ns()}.replaying")
        return self.pending_files()

    @staticmethod
    def read(path: Path, chunk: int = 1000) -> Iterator[list[Row]]:
        batch: list[Row] = []
        with path.open("rb") as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    batch.append(orjson.loads(line))
                except orjson.JSONDecodeError:
                    # A torn last line from a crash mid-write; fsync'd lines before it are whole.
                    continue
                if len(batch) >= chunk:
                    yield batch
                    batch = []
        if batch:
            yield batch

    def count(self) -> int:
        """Rows waiting on disk (live + sealed), for metrics and tests."""
        n = 0
        for p in [self._live, *self.pending_files()]:
            if p.exists():
                with p.open("rb") as f:
                    n += sum(1 for line in f if line.strip())
        return n
