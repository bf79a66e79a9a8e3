"""Shared state for several gateway replicas: the MemoryState semantics, kept in Redis.

Every method is one round trip: a Lua script (EVALSHA) that runs atomically in Redis, so replicas
never read-modify-write from the client. The scripts (redis_scripts.py) are ports of memory.py and
take the caller's clock as an argument: results depend only on the arguments and the stored state.

Scripts touch keys they compute from the prefix (settle only learns its keys from the stored
reservation), so this targets a single Redis primary (with replicas or Sentinel), not Cluster.
"""

from __future__ import annotations

import math
import time
from typing import Any

import orjson
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError
from redis.exceptions import TimeoutError as RedisTimeoutError

from margin.domain.budget import CounterState, Hold, ReserveResult
from margin.state.base import StateUnavailable
from margin.state.redis_scripts import RESERVE, SETTLE, SNAPSHOT

# A reservation record outlives its ttl so that a late settle (a slow stream whose reservation
# lapsed) still records its spend, as MemoryState does; after this it is garbage.
RECORD_GRACE_S = 86_400.0
FIRED_MIN_TTL_S = 60.0  # mark_fired with a past expiry must still dedupe for a while
RECOVERY_RID = "__recovery__"  # the rid MemoryState.add_spent settles under
_UNAVAILABLE = (RedisConnectionError, RedisTimeoutError, ReadOnlyError, OSError)


def _f(x: float) -> str:
    return repr(float(x))  # shortest exact round-trip; Lua's tonumber reads it back bit-identical


def _encode(holds: list[Hold]) -> str:
    for h in holds:
        if h.kind not in ("budget", "bucket"):
            raise ValueError(f"hold {h.key!r}: unknown kind {h.kind!r}")
        if h.kind == "bucket" and not h.window_s > 0:
            # MemoryState raises ZeroDivisionError; Lua would store inf/nan, so refuse before any write
            raise ValueError(f"bucket hold {h.key!r} needs window_s > 0")
    rows = [[h.key, h.kind, int(h.limit), int(h.amount), float(h.expires_at), float(h.window_s)] for h in holds]
    return orjson.dumps(rows).decode()


def _states(flat: list[Any], start: int) -> dict[str, CounterState]:
    """Triples from the scripts: (key, "b", level) for buckets, (key, spent, reserved) for budgets.
    A key repeated in the holds is reported once, its last state (as in MemoryState's dict)."""
    out: dict[str, CounterState] = {}
    for i in range(start, len(flat), 3):
        key, a, b = flat[i], flat[i + 1], flat[i + 2]
        out[key] = CounterState(int(float(b))) if a == "b" else CounterState(int(a), int(b))
    return out


class RedisState:
    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        prefix: str = "margin:",
        timeout_s: float = 0.5,
        max_connections: int = 64,
    ) -> None:
        self._prefix = prefix
        # Blocking pool: a burst waits (up to timeout_s) for a connection instead of failing at once.
        # No retries: a command that timed out may have run, and reserve/add_spent are not idempotent.
        self._pool: BlockingConnectionPool = BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=timeout_s,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
            decode_responses=True,
        )
        kw = self._pool.connection_kwargs
        self._where = kw.get("path") or f"{kw.get('host', '?')}:{kw.get('port', '?')}/{kw.get('db', 0)}"
        self._redis: Redis = Redis(connection_pool=self._pool)
        self._reserve: AsyncScript = self._redis.register_script(RESERVE)
        self._settle: AsyncScript = self._redis.register_script(SETTLE)
        self._snapshot: AsyncScript = self._redis.register_script(SNAPSHOT)

    async def _run(self, what: str, script: AsyncScript, args: list[str]) -> list[Any]:
        try:
            result = await script(keys=[], args=[self._prefix, *args])
        except _UNAVAILABLE as e:
            raise StateUnavailable(f"Redis at {self._where} unavailable during {what}: {type(e).__name__}: {e}") from e
        return list(result)

    async def reserve(self, rid: str, holds: list[Hold], now: float, ttl_s: float) -> ReserveResult:
        """All holds or none; states are the counters just before this reservation."""
        record_at = math.ceil((float(now) + float(ttl_s) + RECORD_GRACE_S) * 1000)
        flat = await self._run(
            "reserve", self._reserve, [_f(now), rid, _f(ttl_s), _encode(holds), str(record_at)]
        )
        ok, failed_key, retry_after = int(flat[0]) == 1, str(flat[1]), float(flat[2])
        return ReserveResult(ok, failed_key, _states(flat, 3), retry_after_s=retry_after)

    async def settle(self, rid: str, actual: dict[str, int], now: float) -> dict[str, CounterState]:
        """Spend `actual` on the reservation's budget keys, return unused bucket tokens; returns the
        post-settle state of each budget key. Unknown (or garbage-collected) ids settle nothing."""
        return await self._settle_call(rid, actual, now, "")

    async def _settle_call(self, rid: str, actual: dict[str, int], now: float, inline: str) -> dict[str, CounterState]:
        used = orjson.dumps({k: int(v) for k, v in actual.items()}).decode()
        flat = await self._run("settle", self._settle, [_f(now), rid, used, inline])
        return _states(flat, 0)

    async def settle_many(self, items: list[tuple[str, dict[str, int], float]]) -> list[dict[str, CounterState]]:
        """Several settlements in one pipelined round trip (each script still atomic): settling is
        off the request path, so the gateway batches it to save a round trip per call."""
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for rid, actual, now in items:
                    used = orjson.dumps({k: int(v) for k, v in actual.items()}).decode()
                    await self._settle(keys=[], args=[self._prefix, _f(now), rid, used, ""], client=pipe)
                results = await pipe.execute()
        except _UNAVAILABLE as e:
            raise StateUnavailable(f"Redis at {self._where} unavailable during settle: {type(e).__name__}: {e}") from e
        return [_states(list(r), 0) for r in results]

    async def snapshot(self, holds: list[Hold], now: float) -> dict[str, CounterState]:
        flat = await self._run("snapshot", self._snapshot, [_f(now), _encode(holds)])
        return _states(flat, 0)

    async def add_spent(self, hold: Hold, units: int, now: float) -> None:
        """Record spend without a reservation: MemoryState settles a one-hold reservation under
        RECOVERY_RID; here the hold travels with the call instead of being stored first."""
        await self._settle_call(RECOVERY_RID, {hold.key: units}, now, _encode([hold]))

    async def mark_fired(self, key: str, tag: str, expires_at: float) -> bool:
        # Length-prefixed so (key, tag) pairs cannot collide; SET NX is atomic on its own.
        name = f"{self._prefix}f:{len(key)}:{key}:{tag}"
        at = max(math.ceil(expires_at * 1000), math.ceil((time.time() + FIRED_MIN_TTL_S) * 1000))
        try:
            first = await self._redis.set(name, "1", nx=True, pxat=at)
        except _UNAVAILABLE as e:
            raise StateUnavailable(f"Redis at {self._where} unavailable during mark_fired: {e}") from e
        return bool(first)

    async def first_seen(self, key: str, now: float, expires_at: float) -> float:
        # SET NX GET (Redis >= 7.0) is one atomic round trip: the first writer's time wins.
        name = f"{self._prefix}s:{key}"
        at = max(math.ceil(expires_at * 1000), math.ceil((now + FIRED_MIN_TTL_S) * 1000))
        try:
            old = await self._redis.set(name, repr(now), nx=True, get=True, pxat=at)
            if old is not None:
                await self._redis.pexpireat(name, at)  # a run that is still active stays alive
        except _UNAVAILABLE as e:
            raise StateUnavailable(f"Redis at {self._where} unavailable during first_seen: {e}") from e
        return float(old) if old is not None else now

    async def close(self) -> None:
        await self._redis.aclose()
        await self._pool.aclose()
