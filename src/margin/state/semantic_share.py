"""Semantic-cache entries shared by replicas through one Redis stream.

Each replica keeps its own HNSW index (`state.semantic`: searching in process is what keeps a
lookup at a few milliseconds), and every entry a replica stores is also appended to a capped Redis
stream. Every replica follows the stream and indexes the entries the others stored, so a paraphrase
answered on one replica is a hit on all of them within about `block_ms`, and a replica that starts
(or restarts) reads the stream from the beginning and starts warm. Redis is not needed to answer:
if it is down, each replica goes on with what it has and catches up when it is back.

Entries carry their wall-clock expiry, so a late reader never revives an expired answer. The stream
is capped near `max_entries` (XADD MAXLEN ~): the oldest entries leave it first, as in each index.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np

from margin.state.cache import CachedAnswer
from margin.state.semantic import Vector

STREAM = "margin:semantic:entries"
log = logging.getLogger("margin.gateway")


@dataclass(frozen=True, slots=True)
class SharedEntry:
    tenant: str
    context: str
    text: str
    vector: Vector
    answer: CachedAnswer
    expires_at: float  # epoch seconds


class SharedEntries:
    def __init__(self, url: str, max_entries: int, timeout_s: float = 2.0, stream: str = STREAM,
                 block_ms: int = 1000):
        from redis.asyncio import Redis

        # A read blocks up to block_ms on the stream: the socket waits a little longer than that.
        self._r: Any = Redis.from_url(url, socket_timeout=timeout_s + block_ms / 1000,
                                      socket_connect_timeout=timeout_s)
        self.block_ms = block_ms
        self.stream, self.max_entries = stream, max_entries
        self.origin = uuid.uuid4().hex  # this replica: its own entries are already in its index
        self.last_id = "0-0"  # read from the start: a new replica starts warm
        self.skipped = 0

    async def publish(self, e: SharedEntry) -> None:
        fields = {"o": self.origin, "t": e.tenant, "c": e.context, "x": e.text,
                  "v": np.asarray(e.vector, dtype=np.float32).tobytes(), "a": e.answer.dumps(),
                  "e": repr(e.expires_at)}
        await self._r.xadd(self.stream, fields, maxlen=self.max_entries, approximate=True)

    async def follow(self, now: float, count: int = 500) -> list[SharedEntry]:
        """The entries other replicas stored since the last call (waiting up to `block_ms` for some)."""
        got = await self._r.xread({self.stream: self.last_id}, count=count, block=self.block_ms)
        out: list[SharedEntry] = []
        for _, rows in got or ():
            for entry_id, f in rows:
                self.last_id = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
                try:
                    if f.get(b"o", b"").decode() == self.origin or float(f[b"e"]) <= now:
                        continue
                    out.append(SharedEntry(f[b"t"].decode(), f[b"c"].decode(), f[b"x"].decode(),
                                           np.frombuffer(f[b"v"], dtype=np.float32).copy(),
                                           CachedAnswer.loads(f[b"a"]), float(f[b"e"])))
                except Exception as e:  # one malformed entry (another version?) costs only itself
                    self.skipped += 1
                    log.warning("semantic cache: skipped shared entry %s: %s: %s", self.last_id, type(e).__name__, e)
        return out

    async def close(self) -> None:
        await self._r.aclose()
