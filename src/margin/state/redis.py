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
from collections.abc import Callable
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
from margin.state.redis_scripts import REBUILD, RESERVE, RESTORE, SETTLE, SNAPSHOT

# A reservation record outlives its ttl so that a late settle (a slow stream whose reservation
# lapsed) still records its spend, as MemoryState does; after this it is garbage.
RECORD_GRACE_S = 86_400.0
FIRED_MIN_TTL_S = 60.0  # mark_fired with a past expiry must still dedupe for a while
RECOVERY_RID = "__recovery__"  # the rid MemoryState.add_spent settles under
_UNAVAILABLE = (RedisConnectionError, RedisTimeoutError, ReadOnlyError, OSError)
MAX_UNSETTLED = 100_000  # settlements kept for retry while Redis is unreachable


class StateNotReady(StateUnavailable):
    """Redis answers but its counters are gone (restarted without its data) and have not been
    rebuilt from the ledger yet: as unsafe to reserve against as an unreachable Redis."""


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
        pool_wait_s: float = 2.0,
    ) -> None:
        self._prefix = prefix
        # Blocking pool: a burst waits (up to pool_wait_s) for a connection instead of failing at
        # once; waiting for a free connection is safe, unlike a command timeout, so it may be longer.
        # No retries: a command that timed out may have run, and reserve/add_spent are not idempotent.
        self._pool: BlockingConnectionPool = BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=max(timeout_s, pool_wait_s),
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
        self._restore: AsyncScript = self._redis.register_script(RESTORE)
        self._rebuild: AsyncScript = self._redis.register_script(REBUILD)
        # Set by gateway/reconcile.py: reservations need the `ready` marker (counters rebuilt from
        # the ledger), and this replica remembers what it has in flight so it can put it back.
        self.require_ready = False
        self.on_not_ready: Callable[[], None] | None = None
        self._inflight: dict[str, tuple[str, float, str]] = {}  # rid -> (budget holds JSON, lapse at, record ms)
        self._unsettled: list[tuple[str, dict[str, int], float]] = []

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
            "reserve", self._reserve,
            [_f(now), rid, _f(ttl_s), _encode(holds), str(record_at), "1" if self.require_ready else "0"],
        )
        if int(flat[0]) == -1:
            if self.on_not_ready is not None:
                self.on_not_ready()
            raise StateNotReady(f"Redis at {self._where} has lost its budget counters; they are being rebuilt "
                                "from the ledger")
        ok, failed_key, retry_after = int(flat[0]) == 1, str(flat[1]), float(flat[2])
        if ok and self.require_ready:
            budget = [h for h in holds if h.kind == "budget"]
            if budget:
                self._inflight[rid] = (_encode(budget), float(now) + float(ttl_s), str(record_at))
        return ReserveResult(ok, failed_key, _states(flat, 3), retry_after_s=retry_after)

    async def settle(self, rid: str, actual: dict[str, int], now: float) -> dict[str, CounterState]:
        """Spend `actual` on the reservation's budget keys, return unused bucket tokens; returns the
        post-settle state of each budget key. Unknown (or garbage-collected) ids settle nothing."""
        states = await self._settle_call(rid, actual, now, "")
        self._inflight.pop(rid, None)
        return states

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
            # Kept and sent again once Redis answers (settling is idempotent by rid: the script
            # deletes the reservation record, so a repeat settles nothing), or the spend would be
            # missing from the counters for good while the ledger has it.
            self._unsettled.extend(items)
            del self._unsettled[:-MAX_UNSETTLED]
            raise StateUnavailable(f"Redis at {self._where} unavailable during settle: {type(e).__name__}: {e}") from e
        for rid, _, _ in items:
            self._inflight.pop(rid, None)
        return [_states(list(r), 0) for r in results]

    # -- reconciliation after Redis lost its data (driven by gateway/reconcile.py) --------------
    async def is_ready(self) -> bool:
        try:
            return bool(await self._redis.exists(self._prefix + "ready"))
        except _UNAVAILABLE as e:
            raise StateUnavailable(f"Redis at {self._where} unavailable: {e}") from e

    def prune_inflight(self, now: float) -> None:
        for rid in [r for r, (_, lapse, _) in self._inflight.items() if lapse <= now]:
            del self._inflight[rid]

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    async def retry_unsettled(self) -> int:
        items, self._unsettled = self._unsettled, []
        if items:
            await self.settle_many(items)  # puts them back on failure
        return len(items)

    async def restore_inflight(self, now: float) -> int:
        """Put back this replica's live reservations (after Redis came back empty)."""
        self.prune_inflight(now)
        items = [[rid, lapse, holds, rec] for rid, (holds, lapse, rec) in self._inflight.items()]
        if not items:
            return 0
        try:
            n = await self._restore(keys=[], args=[self._prefix, _f(now), orjson.dumps(items).decode()])
        except _UNAVAILABLE as e:
            raise StateUnavailable(f"Redis at {self._where} unavailable during restore: {e}") from e
        return int(n)

    async def rebuild(self, spend: list[tuple[Hold, int]], now: float, token: str) -> bool:
        """Add the ledger's spend per counter and set the ready marker, atomically; False if another
        replica got there first (then nothing is added)."""
        items = [[[h.key, h.kind, int(h.limit), int(h.amount), float(h.expires_at), float(h.window_s)], int(u)]
                 for h, u in spend]
        try:
            done = await self._rebuild(keys=[], args=[self._prefix, _f(now), token, orjson.dumps(items).decode()])
        except _UNAVAILABLE as e:
            raise StateUnavailable(f"Redis at {self._where} unavailable during rebuild: {e}") from e
        return int(done) == 1

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

    async def flag(self, key: str, expires_at: float) -> None:
        at = max(math.ceil(expires_at * 1000), math.ceil(time.time() * 1000) + 1)
        try:
            await self._redis.set(f"{self._prefix}g:{key}", "1", pxat=at)
        except _UNAVAILABLE as e:
            raise StateUnavailable(f"Redis at {self._where} unavailable during flag: {e}") from e

    async def flagged(self, key: str, now: float) -> bool:
        try:
            return bool(await self._redis.exists(f"{self._prefix}g:{key}"))
        except _UNAVAILABLE as e:
            raise StateUnavailable(f"Redis at {self._where} unavailable during flagged: {e}") from e

    async def first_seen(self, key: str, now: float, expires_at: float) -> float:
        # SET NX GET (Redis >= 7.0) is one atomic round trip: the first writer's time wins.
        name = f"{self._prefix}s:{key}"
        at = max(math.ceil(expires_at * 1000), math.ceil((now + FIRED_MIN_TTL_S) * 1000))
        try:
            old = await self._redis.set(name, repr(now), nx=True, get=True, pxat=at)
            if old is not None:
                await self._redis.pexpireat(name, at, gt=True)  # an active run stays alive; never shortened
        except _UNAVAILABLE as e:
            raise StateUnavailable(f"Redis at {self._where} unavailable during first_seen: {e}") from e
        return float(old) if old is not None else now

    async def close(self) -> None:
        await self._redis.aclose()
        await self._pool.aclose()
