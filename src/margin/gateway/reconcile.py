"""Budget counters in Redis, reconciled from the ledger when Redis loses its data.

Redis keeps budget counters in memory; a restart without persistence (or a failover to an empty
replica, or a FLUSHALL) would silently reset every budget to zero and let the period's spend
happen again. So the counters carry a marker, `<prefix>ready`, set in the same atomic step that
writes the spend rebuilt from the ledger. Every reservation requires the marker (RESERVE checks
it), so from the moment Redis comes back empty no replica can reserve against a zeroed counter:
calls that a budget covers get the configured state_failure behaviour (closed: 503; open: the
local allowance) until the counters are back. Then, on each replica:

1. the failed reservation (or the watch loop, every `poll_s`) notices the marker is missing;
2. the replica puts back the reservations it still has in flight (RESTORE, idempotent by rid),
   so calls that started before the restart stay covered;
3. it waits `grace_s`, so every other replica has done (2) and events of calls that just ended
   have reached the ledger;
4. it sums this period's spend per counter from the ledger, with the arithmetic start-up uses for
   in-memory state (recovery.recover_spend), and REBUILDs: spend added and marker set atomically,
   only if nobody set the marker first, so racing replicas cannot count the ledger twice.

Counting errs towards stricter budgets, never looser: a call that settles between (2) and (4) is
counted by both its restored reservation and the ledger. Known gaps: events a replica is still
spooling because the ledger store is down too are not in the sum; rate-limit buckets and runs' loop
detection start afresh (runs' dollars, calls, tool calls and wall-time clocks are rebuilt). The
same path initialises an empty Redis at first start, so a new Redis never
starts budgets at zero while the ledger knows better.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, cast

from margin.domain.budget import Hold
from margin.gateway.budgets import BudgetGuard
from margin.gateway.recovery import recover_spend
from margin.state.base import StateUnavailable
from margin.state.redis import RedisState
from margin.tasks import cancel_and_wait

if TYPE_CHECKING:
    from margin.gateway.app import MarginApp

log = logging.getLogger("margin.reconcile")


class _Collect:
    """Stands in for the state in recover_spend: collects (counter, units) and runs' clocks
    instead of setting them."""

    def __init__(self) -> None:
        self.items: list[tuple[Hold, int]] = []
        self.starts: list[tuple[str, float, float]] = []

    async def add_spent(self, hold: Hold, units: int, now: float) -> None:
        self.items.append((hold, units))

    async def first_seen(self, key: str, now: float, expires_at: float) -> float:
        self.starts.append((key, now, expires_at))
        return now


async def ledger_spend(store: Any, guard: BudgetGuard) -> _Collect:
    """This period's settled spend per budget counter, and runs' wall-time clocks, as start-up
    recovery computes them."""
    collect = _Collect()
    stand_in = SimpleNamespace(budgets=guard.budgets, run_caps=guard.run_caps, state=collect)
    await recover_spend(store, cast(BudgetGuard, stand_in))
    return collect


class Reconciler:
    def __init__(self, state: RedisState, store: Any, guard: BudgetGuard, grace_s: float = 1.0,
                 poll_s: float = 0.25):
        self.state, self.store, self.guard = state, store, guard
        self.grace_s, self.poll_s = grace_s, poll_s
        self.rebuilds = 0  # counter rebuilds this replica performed
        self.restored = 0  # in-flight reservations it put back
        self.last_error = ""
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._who = f"{socket.gethostname()}:{os.getpid()}"

    def wake(self) -> None:
        self._wake.set()

    async def start(self) -> None:
        """Take over the state's reservation gate, make sure the counters are there (rebuilding
        them once if Redis is empty), then keep watching."""
        self.state.require_ready = True
        self.state.on_not_ready = self.wake
        try:
            await self.check()
        except Exception as e:  # Redis or the ledger down at start: the loop keeps trying
            self.last_error = f"{type(e).__name__}: {e}"
            log.error("budget counters not verified at start-up (%s); budgeted calls wait for them", e)
        self._task = asyncio.create_task(self._loop(), name="budget-reconcile")

    async def _loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_s)
            self._wake.clear()
            try:
                await self.check()
                self.last_error = ""
            except StateUnavailable as e:
                self.last_error = str(e)
            except Exception as e:  # the ledger unreadable, a bug: log, never die
                self.last_error = f"{type(e).__name__}: {e}"
                log.error("budget reconciliation failed, retrying: %s", self.last_error)

    async def check(self) -> bool:
        """One round: retry settlements Redis missed, and rebuild the counters if they are gone.
        Returns True if this replica rebuilt them."""
        now = time.time()
        self.state.prune_inflight(now)
        if await self.state.is_ready():
            await self.state.retry_unsettled()
            return False
        log.warning("Redis has no budget counters (restarted without its data?): restoring %d in-flight "
                    "reservations, rebuilding from the ledger in %.1f s", self.state.inflight, self.grace_s)
        self.restored += await self.state.restore_inflight(now)
        await asyncio.sleep(self.grace_s)
        if await self.state.is_ready():  # another replica rebuilt them meanwhile
            self.restored += await self.state.restore_inflight(time.time())
            await self.state.retry_unsettled()
            return False
        found = await ledger_spend(self.store, self.guard)
        token = f"{datetime.now(UTC).isoformat()} {self._who}"
        done = await self.state.rebuild(found.items, time.time(), token)
        if done:
            self.rebuilds += 1
            for key, start, expires_at in found.starts:  # first writer wins: a clock set since is kept
                await self.state.first_seen(key, start, expires_at)
            log.warning("budget counters rebuilt from the ledger: %d counters, %d run clocks",
                        len(found.items), len(found.starts))
        await self.state.retry_unsettled()
        return done

    def stats(self) -> dict[str, Any]:
        return {"rebuilds": self.rebuilds, "restored": self.restored, "inflight": self.state.inflight,
                "last_error": self.last_error}

    async def close(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None


async def start_reconciler(app: MarginApp) -> Reconciler | None:
    """Called at start-up once budgets are loaded; only shared (Redis) state needs it."""
    state = app.guard.state
    if not isinstance(state, RedisState):
        return None
    r = Reconciler(state, app.store, app.guard)
    await r.start()
    return r
