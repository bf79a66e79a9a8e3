"""Pure decisions of the batch lane: is the lane's window open, how many items to claim now, what a
finished run means for its item (done, failed, try again later, expired) and when a batch moves on.
No I/O and no clock: `now` is always an argument."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal
from zoneinfo import ZoneInfo

from margin.domain import budget

MIN_WINDOW_S, MAX_WINDOW_S = 60, 7 * 86400
BACKOFF_BASE_S, BACKOFF_MAX_S = 1.0, 300.0
OPEN = ("queued", "running", "forward", "upstream")  # item states that still owe an answer
TERMINAL = ("done", "failed", "expired", "cancelled")


@dataclass(frozen=True, slots=True)
class Window:
    """A daily interval in minutes since local midnight; start > end wraps past midnight."""

    start: int
    end: int

    def contains(self, minute: int) -> bool:
        if self.start == self.end:
            return True  # "00:00-24:00" style: all day
        if self.start < self.end:
            return self.start <= minute < self.end
        return minute >= self.start or minute < self.end


def parse_window(spec: str) -> Window:
    """`22:00-06:00` -> Window(1320, 360). Raises ValueError naming the spec."""
    try:
        a, b = spec.split("-")
        (h1, m1), (h2, m2) = (map(int, a.split(":")), map(int, b.split(":")))
    except ValueError:
        raise ValueError(f"window {spec!r} is not HH:MM-HH:MM") from None
    start, end = h1 * 60 + m1, h2 * 60 + m2
    if not (0 <= start < 1440 and 0 <= end <= 1440):
        raise ValueError(f"window {spec!r} is outside 00:00-24:00")
    return Window(start, end % 1440)  # 24:00 is midnight; equal ends mean all day


def window_open(windows: Sequence[Window], tz: str, now: datetime) -> bool:
    if not windows:
        return True
    local = now.astimezone(ZoneInfo(tz))
    minute = local.hour * 60 + local.minute
    return any(w.contains(minute) for w in windows)


def next_open(windows: Sequence[Window], tz: str, now: datetime) -> datetime:
    """The first minute boundary at or after `now` when a window is open (`now` if open)."""
    if window_open(windows, tz, now):
        return now
    t = now.replace(second=0, microsecond=0)
    for _ in range(2 * 1440 + 1):  # a minute at a time over two days covers DST shifts
        t += timedelta(minutes=1)
        if window_open(windows, tz, t):
            return t
    return now  # unreachable with at least one window


def duration_s(text: str) -> int:
    """`24h` -> 86400, `30m` -> 1800; between one minute and seven days."""
    if not text.strip().endswith(("m", "h")):  # OpenAI's form: hours or minutes only
        raise ValueError(f"{text!r} is not a duration like 24h or 30m")
    s = budget.duration_s(text)
    if not MIN_WINDOW_S <= s <= MAX_WINDOW_S:
        raise ValueError(f"{text!r} must be between 1m and 168h")
    return s


def claimable(max_concurrency: int, in_flight: int, rpm: int, recent_starts: Sequence[float], now: float) -> int:
    """How many items this replica may start now: free concurrency slots, and what is left of the
    requests-per-minute allowance over the last 60 s (0 rpm: no allowance limit)."""
    free = max(0, max_concurrency - in_flight)
    if rpm <= 0:
        return free
    started = sum(1 for t in recent_starts if t > now - 60.0)
    return max(0, min(free, rpm - started))


Outcome = Literal["done", "failed", "wait", "retry"]
# Codes that mean "not now" rather than "never": a budget deferral or a rate limit (margin's or
# the provider's), the key store or budget state briefly down.
_WAIT_CODES = frozenset({"budget_deferred", "rate_limit_exceeded", "upstream_rate_limited",
                         "key_store_unavailable", "budget_state_unavailable"})


def classify(status: int, code: str) -> Outcome:
    """What one run's answer means for its item."""
    if 200 <= status < 300:
        return "done"
    if status == 429 or code in _WAIT_CODES:
        return "wait"  # budgets reset with their period, buckets refill: wait, until the item expires
    if status >= 500 or status in (408, 499):
        return "retry"
    return "failed"  # the request itself is wrong (400, 401 revoked key, 403, 404): final


@dataclass(frozen=True, slots=True)
class Next:
    """An item's state after a run: final (`status` done/failed/expired) or queued at `not_before`."""

    status: Literal["done", "failed", "expired", "queued"]
    not_before: float = 0.0
    count_attempt: bool = True  # False: the run does not use up one of max_attempts


def after_run(outcome: Outcome, attempts: int, max_attempts: int, now: float, expires_at: float,
              retry_after_s: float | None = None) -> Next:
    """`attempts` counts this run. A wait does not use up an attempt; a transient failure backs off
    exponentially (honouring Retry-After); nothing is retried past the item's expiry."""
    if outcome in ("done", "failed"):
        return Next(outcome)
    if outcome == "wait":
        at = now + max(1.0, retry_after_s or 0.0)
        return Next("expired") if at >= expires_at else Next("queued", at, count_attempt=False)
    if attempts >= max_attempts:
        return Next("failed")
    at = now + max(min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** (attempts - 1)), retry_after_s or 0.0)
    return Next("expired") if at >= expires_at else Next("queued", at)


BatchStep = Literal["complete", "expire", "expired", "cancelled"]


def batch_step(status: str, counts: Mapping[str, int], now: float, expires_at: float) -> BatchStep | None:
    """What to do next with a batch, given how many of its items are in each state.

    in_progress: every item answered -> complete; past its expiry, queued items expire and, once
    nothing runs any more, the batch is expired (`expire` while some still run). cancelling: once
    nothing runs -> cancelled (queued items were cancelled when the cancel arrived)."""
    running = counts.get("running", 0) + counts.get("upstream", 0)
    if status == "in_progress":
        if not any(counts.get(s, 0) for s in OPEN):
            return "complete"
        if now >= expires_at:
            return "expired" if running == 0 else "expire"
        return None
    if status == "cancelling" and running == 0:
        return "cancelled"
    return None
