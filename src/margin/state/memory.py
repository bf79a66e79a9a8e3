"""In-process state for a single replica. Every method runs without awaiting in between, so on
one event loop each call is atomic. It is also the reference the Redis backend is tested against."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from margin.domain.budget import CounterState, Hold, ReserveResult

ROLLING_BUCKETS = 60  # a rolling window is kept as 60 sub-buckets


@dataclass
class _Counter:
    spent: int = 0
    reserved: dict[str, tuple[int, float]] = field(default_factory=dict)  # rid -> (amount, lapses_at)
    rolling: dict[int, int] = field(default_factory=dict)  # bucket index -> spent
    level: float = -1.0  # token bucket fill (-1: full, first use)
    level_at: float = 0.0
    expires_at: float = 0.0

    def prune(self, now: float, window_s: float) -> None:
        for rid in [r for r, (_, t) in self.reserved.items() if t <= now]:
            del self.reserved[rid]
        if window_s and self.rolling:
            oldest = math.floor((now - window_s) / (window_s / ROLLING_BUCKETS))
            for idx in [i for i in self.rolling if i <= oldest]:
                del self.rolling[idx]

    def spent_now(self, window_s: float) -> int:
        return sum(self.rolling.values()) if window_s else self.spent

    def state(self, window_s: float) -> CounterState:
        return CounterState(self.spent_now(window_s), sum(a for a, _ in self.reserved.values()))

    def refill(self, h: Hold, now: float) -> float:
        if self.level < 0:
            self.level, self.level_at = float(h.limit), now
        self.level = min(float(h.limit), self.level + (now - self.level_at) * h.limit / h.window_s)
        self.level_at = now
        return self.level


class MemoryState:
    def __init__(self) -> None:
        self._c: dict[str, _Counter] = {}
        self._res: dict[str, list[Hold]] = {}
        self._fired: dict[tuple[str, str], float] = {}
        self._first: dict[str, tuple[float, float]] = {}  # key -> (first seen, expires at)
        self._flags: dict[str, float] = {}  # key -> expires at

    def _get(self, h: Hold, now: float) -> _Counter:
        c = self._c.get(h.key)
        if c is None or c.expires_at <= now:
            c = self._c[h.key] = _Counter()
        c.expires_at = max(c.expires_at, h.expires_at)
        if h.kind == "budget":
            c.prune(now, h.window_s)
        return c

    async def reserve(self, rid: str, holds: list[Hold], now: float, ttl_s: float) -> ReserveResult:
        states: dict[str, CounterState] = {}
        for h in holds:  # check every hold first: all or nothing
            c = self._get(h, now)
            if h.kind == "bucket":
                level = c.refill(h, now)
                states[h.key] = CounterState(spent=int(level))
                if level < h.amount:
                    wait = (h.amount - level) * h.window_s / h.limit
                    return ReserveResult(False, h.key, states, retry_after_s=wait)
            else:
                st = c.state(h.window_s)
                states[h.key] = st
                if st.spent + st.reserved + h.amount > h.limit:
                    return ReserveResult(False, h.key, states)
        for h in holds:
            c = self._c[h.key]
            if h.kind == "bucket":
                c.level -= h.amount
            else:
                c.reserved[rid] = (h.amount, now + ttl_s)
        self._res[rid] = holds
        self._gc(now)
        return ReserveResult(True, "", states)

    async def settle(self, rid: str, actual: dict[str, int], now: float) -> dict[str, CounterState]:
        holds = self._res.pop(rid, [])
        out: dict[str, CounterState] = {}
        for h in holds:
            c = self._get(h, now)
            used = actual.get(h.key, 0)
            if h.kind == "bucket":
                if used < h.amount:  # give back tokens the call did not use
                    c.level = min(float(h.limit), c.level + (h.amount - used))
                continue
            c.reserved.pop(rid, None)
            if h.window_s:
                idx = math.floor(now / (h.window_s / ROLLING_BUCKETS))
                c.rolling[idx] = c.rolling.get(idx, 0) + used
            else:
                c.spent += used
            out[h.key] = c.state(h.window_s)
        return out

    async def settle_many(self, items: list[tuple[str, dict[str, int], float]]) -> list[dict[str, CounterState]]:
        return [await self.settle(rid, actual, now) for rid, actual, now in items]

    async def snapshot(self, holds: list[Hold], now: float) -> dict[str, CounterState]:
        out = {}
        for h in holds:
            c = self._get(h, now)
            out[h.key] = CounterState(int(c.refill(h, now))) if h.kind == "bucket" else c.state(h.window_s)
        return out

    async def add_spent(self, hold: Hold, units: int, now: float) -> None:
        self._res["__recovery__"] = [hold]
        await self.settle("__recovery__", {hold.key: units}, now)

    async def mark_fired(self, key: str, tag: str, expires_at: float) -> bool:
        if (key, tag) in self._fired:
            return False
        self._fired[(key, tag)] = expires_at
        return True

    async def flag(self, key: str, expires_at: float) -> None:
        now = time.time()
        self._flags = {k: exp for k, exp in self._flags.items() if exp > now}
        self._flags[key] = max(self._flags.get(key, 0.0), expires_at)

    async def flagged(self, key: str, now: float) -> bool:
        return self._flags.get(key, 0.0) > now

    async def first_seen(self, key: str, now: float, expires_at: float) -> float:
        seen = self._first.get(key)
        if seen is None or seen[1] <= now:
            seen = (now, expires_at)
        self._first[key] = (seen[0], max(seen[1], expires_at))
        return seen[0]

    def _gc(self, now: float) -> None:
        if len(self._c) > 100_000:  # bound memory: drop counters whose period has ended
            for k in [k for k, c in self._c.items() if c.expires_at <= now]:
                del self._c[k]
            for k in [k for k, (_, exp) in self._first.items() if exp <= now]:
                del self._first[k]

    async def close(self) -> None:
        return None
