"""What a state backend does: atomic multi-counter reservations, settlement, token buckets."""

from __future__ import annotations

from typing import Protocol

from margin.domain.budget import CounterState, Hold, ReserveResult


class StateUnavailable(Exception):
    """The shared state (Redis) cannot be reached; the gateway applies its configured failure mode."""


class State(Protocol):
    async def reserve(self, rid: str, holds: list[Hold], now: float, ttl_s: float) -> ReserveResult:
        """All holds or none. Budget holds need spent + reserved + amount <= limit; bucket holds
        need `amount` tokens in the bucket. Reservations not settled within ttl_s lapse."""

    async def settle(self, rid: str, actual: dict[str, int], now: float) -> dict[str, CounterState]:
        """Turn a reservation into spend: `actual` units per budget key (missing keys: 0); bucket
        tokens beyond the actual are returned. Unknown or lapsed ids settle as spend only."""

    async def settle_many(self, items: list[tuple[str, dict[str, int], float]]) -> list[dict[str, CounterState]]:
        """`settle` for several (rid, actual, now) at once, in order."""

    async def snapshot(self, holds: list[Hold], now: float) -> dict[str, CounterState]: ...

    async def add_spent(self, hold: Hold, units: int, now: float) -> None:
        """Record spend without a reservation (recovery from the ledger at start-up)."""

    async def mark_fired(self, key: str, tag: str, expires_at: float) -> bool:
        """True the first time (key, tag) is marked: threshold notifications fire once per period."""

    async def first_seen(self, key: str, now: float, expires_at: float) -> float:
        """The time first recorded under `key` (recording `now` if nothing was): when a run began."""

    async def flag(self, key: str, expires_at: float) -> None:
        """Set a marker every replica sees until `expires_at` (a dashboard session signed out)."""

    async def flagged(self, key: str, now: float) -> bool:
        """Whether `flag(key)` was set and has not expired."""

    async def close(self) -> None: ...
