"""The batch lane's pure decisions: windows (wrapping midnight, time zones, DST), claim limits,
what a run's answer means for its item, and when a batch moves on."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from margin.policy import batch as p


def test_windows_wrap_midnight_and_respect_the_time_zone() -> None:
    night = [p.parse_window("22:00-06:00")]
    paris = "Europe/Paris"
    # 21:30 UTC in January is 22:30 in Paris: open there, shut in UTC.
    t = datetime(2026, 1, 15, 21, 30, tzinfo=UTC)
    assert p.window_open(night, paris, t) and not p.window_open(night, "UTC", t)
    assert p.window_open(night, "UTC", datetime(2026, 1, 15, 5, 59, tzinfo=UTC))
    assert not p.window_open(night, "UTC", datetime(2026, 1, 15, 6, 0, tzinfo=UTC))
    assert p.window_open([], "UTC", t), "no window configured: always open"
    assert p.window_open([p.parse_window("00:00-24:00")], "UTC", t)
    assert p.parse_window("18:00-24:00") == p.Window(1080, 0)


def test_next_open_is_the_first_open_minute() -> None:
    w = [p.parse_window("22:00-06:00")]
    assert p.next_open(w, "UTC", datetime(2026, 3, 2, 12, 0, 30, tzinfo=UTC)) == datetime(2026, 3, 2, 22, 0,
                                                                                            tzinfo=UTC)
    now = datetime(2026, 3, 2, 23, 0, tzinfo=UTC)
    assert p.next_open(w, "UTC", now) == now
    # Across the spring DST change in Paris (02:00 -> 03:00 on 2026-03-29): 02:30 local never exists.
    early = [p.parse_window("02:30-04:00")]
    t = p.next_open(early, "Europe/Paris", datetime(2026, 3, 28, 23, 0, tzinfo=UTC))
    assert p.window_open(early, "Europe/Paris", t)


@given(st.integers(0, 1439), st.integers(0, 1440), st.integers(0, 1439))
def test_a_window_contains_exactly_its_minutes(start: int, end: int, minute: int) -> None:
    w = p.Window(start, end % 1440)
    inside = (start <= minute < end % 1440) if start < end % 1440 else (
        True if start == end % 1440 else minute >= start or minute < end % 1440)
    assert w.contains(minute) == inside


@pytest.mark.parametrize("bad", ["22-06", "25:00-06:00", "22:00", "aa:bb-cc:dd"])
def test_bad_windows_are_refused_with_the_spec(bad: str) -> None:
    with pytest.raises(ValueError, match="window"):
        p.parse_window(bad)


def test_durations() -> None:
    assert p.duration_s("24h") == 86400 and p.duration_s("30m") == 1800
    for bad in ("24", "0m", "200h", "1d"):
        with pytest.raises(ValueError):
            p.duration_s(bad)


def test_claims_respect_concurrency_and_the_minute_allowance() -> None:
    now = 1000.0
    assert p.claimable(8, 3, 0, [], now) == 5
    assert p.claimable(8, 8, 0, [], now) == 0
    starts = [now - 70] * 50 + [now - 10] * 9  # only the last minute counts
    assert p.claimable(8, 0, 10, starts, now) == 1
    assert p.claimable(8, 0, 5, starts, now) == 0


def test_what_a_run_means_for_its_item() -> None:
    assert p.classify(200, "") == "done"
    assert p.classify(429, "budget_deferred") == "wait"
    assert p.classify(429, "budget_exceeded") == "wait"
    assert p.classify(429, "rate_limit_exceeded") == "wait"
    assert p.classify(503, "key_store_unavailable") == "wait"
    assert p.classify(502, "upstream_error") == "retry"
    assert p.classify(504, "upstream_timeout") == "retry"
    assert p.classify(400, "invalid_request") == "failed"
    assert p.classify(401, "revoked_api_key") == "failed"
    assert p.classify(404, "model_not_found") == "failed"


def test_retries_back_off_waits_do_not_count_and_nothing_runs_past_expiry() -> None:
    now, exp = 1000.0, 5000.0
    assert p.after_run("done", 1, 5, now, exp) == p.Next("done")
    first, second = p.after_run("retry", 1, 5, now, exp), p.after_run("retry", 2, 5, now, exp)
    assert first.status == second.status == "queued" and first.not_before - now < second.not_before - now
    assert p.after_run("retry", 3, 5, now, exp, retry_after_s=30).not_before == now + 30
    assert p.after_run("retry", 5, 5, now, exp).status == "failed"
    wait = p.after_run("wait", 9, 5, now, exp, retry_after_s=60)
    assert wait == p.Next("queued", now + 60, count_attempt=False), "a budget wait never uses up an attempt"
    assert p.after_run("wait", 1, 5, now, exp, retry_after_s=86400).status == "expired"


def test_batch_steps() -> None:
    now, later = 1000.0, 2000.0
    assert p.batch_step("in_progress", {"done": 3, "failed": 1}, now, later) == "complete"
    assert p.batch_step("in_progress", {"done": 3, "queued": 1}, now, later) is None
    assert p.batch_step("in_progress", {"forward": 1}, now, later) is None
    assert p.batch_step("in_progress", {"queued": 2, "running": 1}, later, now) == "expire"
    assert p.batch_step("in_progress", {"queued": 2}, later, now) == "expired"
    assert p.batch_step("cancelling", {"running": 1, "cancelled": 5}, now, later) is None
    assert p.batch_step("cancelling", {"done": 1, "cancelled": 5}, now, later) == "cancelled"
    assert p.batch_step("completed", {}, now, later) is None


def test_next_open_with_a_one_minute_window_is_within_a_day() -> None:
    w = [p.parse_window("03:07-03:08")]
    start = datetime(2026, 6, 1, 3, 8, tzinfo=UTC)
    t = p.next_open(w, "UTC", start)
    assert t - start <= timedelta(days=1) and (t.hour, t.minute) == (3, 7)
