"""Per-provider circuit breakers: after N consecutive failures a provider is skipped for a
cool-down; then one trial call is let through (half-open) and its result closes or re-opens it."""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(slots=True)
class _Circuit:
    failures: int = 0
    opened_at: float = 0.0
    trial: bool = False  # half-open: one call is in flight to test the provider


class Breakers:
    def __init__(self, failures: int = 5, cooldown_s: float = 30.0):
        self.threshold = failures
        self.cooldown_s = cooldown_s
        self._c: dict[str, _Circuit] = {}

    def state(self, provider: str, now: float | None = None) -> str:
        c = self._c.get(provider)
        if c is None or c.failures < self.threshold:
            return "closed"
        if (now or time.monotonic()) - c.opened_at >= self.cooldown_s:
            return "half-open"
        return "open"

    def open_providers(self, now: float | None = None) -> frozenset[str]:
        now = now or time.monotonic()
        out = set()
        for name, c in self._c.items():
            st = self.state(name, now)
            if st == "open" or (st == "half-open" and c.trial):
                out.add(name)
        return frozenset(out)

    def before_call(self, provider: str) -> None:
        c = self._c.get(provider)
        if c is not None and self.state(provider) == "half-open":
            c.trial = True

    def success(self, provider: str) -> None:
        self._c.pop(provider, None)

    def failure(self, provider: str) -> None:
        c = self._c.setdefault(provider, _Circuit())
        c.failures += 1
        c.trial = False
        if c.failures >= self.threshold:
            c.opened_at = time.monotonic()  # (re)open: a failed trial restarts the cool-down

    def snapshot(self) -> dict[str, str]:
        return {name: self.state(name) for name in self._c}
