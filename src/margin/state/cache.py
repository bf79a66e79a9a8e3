"""Exact-cache storage: in-process LRU with TTL, or Redis (shared by replicas, expiring by TTL)."""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import orjson

from margin.state.base import StateUnavailable


@dataclass(frozen=True, slots=True)
class CachedAnswer:
    """A complete answer: the JSON body, or the SSE events of a stream; and what it used."""

    model: str
    body: str = ""
    chunks: list[str] = field(default_factory=list)
    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    reasoning_tokens: int = 0

    def dumps(self) -> bytes:
        return orjson.dumps(asdict(self))

    @staticmethod
    def loads(data: bytes) -> CachedAnswer:
        return CachedAnswer(**orjson.loads(data))


class Cache(Protocol):
    async def get(self, key: str) -> CachedAnswer | None: ...

    async def put(self, key: str, answer: CachedAnswer, ttl_s: float) -> None: ...

    async def close(self) -> None: ...


class MemoryCache:
    def __init__(self, max_entries: int = 10_000):
        self.max_entries = max_entries
        self._d: OrderedDict[str, tuple[float, CachedAnswer]] = OrderedDict()

    async def get(self, key: str) -> CachedAnswer | None:
        hit = self._d.get(key)
        if hit is None:
            return None
        if hit[0] <= time.monotonic():
            del self._d[key]
            return None
        self._d.move_to_end(key)  # least recently used goes first
        return hit[1]

    async def put(self, key: str, answer: CachedAnswer, ttl_s: float) -> None:
        self._d[key] = (time.monotonic() + ttl_s, answer)
        self._d.move_to_end(key)
        while len(self._d) > self.max_entries:
            self._d.popitem(last=False)

    async def close(self) -> None:
        return None


class RedisCache:
    def __init__(self, url: str, prefix: str = "margin:cache:", timeout_s: float = 0.5):
        from redis.asyncio import Redis

        self._r: Any = Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self._prefix = prefix

    async def get(self, key: str) -> CachedAnswer | None:
        try:
            data = await self._r.get(self._prefix + key)
        except (OSError, ConnectionError, TimeoutError) as e:
            raise StateUnavailable(f"cache: {e}") from e
        except Exception as e:  # redis' own connection errors
            raise StateUnavailable(f"cache: {e}") from e
        return CachedAnswer.loads(data) if data else None

    async def put(self, key: str, answer: CachedAnswer, ttl_s: float) -> None:
        try:
            await self._r.set(self._prefix + key, answer.dumps(), ex=max(1, int(ttl_s)))
        except Exception as e:
            raise StateUnavailable(f"cache: {e}") from e

    async def close(self) -> None:
        await self._r.aclose()
