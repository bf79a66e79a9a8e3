"""RedisState against the real Redis on 127.0.0.1:6379: it must return exactly what MemoryState
returns for any sequence of calls, stay within limits under racing replicas, and fail fast."""

from __future__ import annotations

import asyncio
import concurrent.futures
import multiprocessing
import os
import random
import socket
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from margin.domain.budget import CounterState, Hold
from margin.state.base import StateUnavailable
from margin.state.memory import MemoryState
from margin.state.redis import RedisState

REDIS_URL = "redis://127.0.0.1:6379/0"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="module")
def redis_url() -> str:
    try:
        redis.Redis.from_url(REDIS_URL, socket_timeout=1, socket_connect_timeout=1).ping()
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as e:
        if IN_CI:
            pytest.fail(f"Redis is required in CI and is not reachable at {REDIS_URL}: {e}")
        pytest.skip(f"Redis not reachable at {REDIS_URL}")
    return REDIS_URL


async def drop_prefix(prefix: str) -> None:
    client = redis.asyncio.Redis.from_url(REDIS_URL)
    try:
        keys = [k async for k in client.scan_iter(match=prefix + "*", count=1000)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


# ---- differential test: MemoryState is the reference ------------------------------------------

# key -> (kind, window_s); rolling budgets with a long and a short window, buckets slow and fast
KEYS: dict[str, tuple[str, float]] = {
    "b1": ("budget", 0.0),
    "b2": ("budget", 0.0),
    "r1": ("budget", 60.0),
    "r2": ("budget", 6.0),
    "t1": ("bucket", 60.0),
    "t2": ("bucket", 1.0),
}
# (key, limit, amount, expires_at offset): offsets below 0 make counters that reset on every touch
HoldSpec = tuple[str, int, int, float]


@st.composite
def hold_specs(draw: st.DrawFn) -> HoldSpec:
    key = draw(st.sampled_from(sorted(KEYS)))
    if KEYS[key][0] == "bucket":
        limit, amount = draw(st.sampled_from([10, 30])), draw(st.one_of(st.integers(0, 8), st.integers(0, 35)))
    else:
        limit, amount = draw(st.sampled_from([100, 200, 60, 0])), draw(st.integers(0, 45))
    # 30 and 60 are reachable exactly by the clock steps below: expiry boundaries get hit
    return key, limit, amount, draw(st.sampled_from([5000.0, 400.0, 30.0, 60.0, -1.0]))


rids = st.integers(0, 4).map(lambda n: f"rid-{n}")  # small: reuse and unknown ids both happen
holds = st.lists(hold_specs(), min_size=1, max_size=4)
reserve = st.tuples(st.just("reserve"), rids, holds, st.sampled_from([10.0, 1.0, 100.0, 0.3]))
settle = st.tuples(st.just("settle"), rids, st.dictionaries(st.sampled_from(sorted(KEYS)), st.integers(0, 50)))
# Steps equal to ttls, windows and sub-bucket widths hit the `<=` boundaries; t0 is a half-integer
# so sums of dyadic steps are exact, and 0.3 / 0.05 keep inexact float arithmetic in play.
advance = st.tuples(st.just("advance"), st.sampled_from([1.0, 0.3, 0.05, 0.1, 2.5, 6.0, 10.0, 30.0, 60.0, 400.0]))
ops = st.one_of(
    reserve, reserve, reserve, settle, settle, advance, advance,
    st.tuples(st.just("snapshot"), holds),
    st.tuples(st.just("add_spent"), hold_specs(), st.integers(0, 50)),
    st.tuples(st.just("mark_fired"), st.sampled_from(["b1", "t1"]), st.sampled_from(["50", "80"])),
)


def make_hold(spec: HoldSpec, t0: float) -> Hold:
    key, limit, amount, exp_off = spec
    kind, window_s = KEYS[key]
    return Hold(key, "bucket" if kind == "bucket" else "budget", limit, amount, t0 + exp_off, window_s)


async def apply(state: Any, op: tuple[Any, ...], now: float, t0: float) -> Any:
    match op:
        case ("reserve", rid, specs, ttl):
            return await state.reserve(rid, [make_hold(s, t0) for s in specs], now, ttl)
        case ("settle", rid, actual):
            return await state.settle(rid, actual, now)
        case ("snapshot", specs):
            return await state.snapshot([make_hold(s, t0) for s in specs], now)
        case ("add_spent", spec, units):
            return await state.add_spent(make_hold(spec, t0), units, now)
        case ("mark_fired", key, tag):
            return await state.mark_fired(key, tag, t0 + 3600)
    raise AssertionError(op)


async def run_both(sequence: list[tuple[Any, ...]]) -> None:
    # The fake clock starts ahead of the real one and only moves forward, so Redis' own (real-time)
    # expiry, which is only garbage collection, never fires before the logical expiry.
    t0 = float(int(time.time()) + 30) + 0.5
    now = t0
    prefix = f"margin-test:{uuid.uuid4().hex}:"
    mem, red = MemoryState(), RedisState(REDIS_URL, prefix=prefix)
    try:
        for i, op in enumerate(sequence):
            if op[0] == "advance":
                now += op[1]
                continue
            expected, got = await apply(mem, op, now, t0), await apply(red, op, now, t0)
            # Exact, bucket levels and retry_after_s included: the Lua does the same float operations.
            assert got == expected, f"step {i} {op} at t0+{now - t0}: redis {got} != memory {expected}"
    finally:
        await red.close()
        await drop_prefix(prefix)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sequence=st.lists(ops, min_size=20, max_size=80))
def test_redis_matches_memory(redis_url: str, sequence: list[tuple[Any, ...]]) -> None:
    asyncio.run(run_both(sequence))


async def test_lapse_refill_and_rolling_window(redis_url: str) -> None:
    """The behaviours the property test must not miss, spelled out once."""
    t0 = time.time() + 30
    prefix = f"margin-test:{uuid.uuid4().hex}:"
    red = RedisState(REDIS_URL, prefix=prefix)
    try:
        b = Hold("b", "budget", 100, 60, t0 + 3600)
        roll = Hold("r", "budget", 100, 60, t0 + 3600, window_s=60.0)
        tpm = Hold("t", "bucket", 10, 10, t0 + 3600, window_s=60.0)
        assert (await red.reserve("a", [b, roll, tpm], t0, ttl_s=5)).ok
        second = await red.reserve("b", [b], t0 + 1, ttl_s=5)
        assert not second.ok and second.failed_key == "b" and second.states["b"] == CounterState(0, 60)
        assert (await red.reserve("b", [b], t0 + 5, ttl_s=5)).ok  # "a" lapsed at t0 + 5
        await red.settle("a", {"b": 10, "r": 40, "t": 4}, t0 + 6)  # late: spend only, 6 tokens back
        snap = await red.snapshot([b, roll, tpm], t0 + 6)
        assert snap == {"b": CounterState(10, 60), "r": CounterState(40, 0), "t": CounterState(7, 0)}
        refused = await red.reserve("c", [tpm], t0 + 7, 5)  # 7 + 1/6 tokens, 10 wanted, 1 per 6 s
        assert not refused.ok and refused.retry_after_s == pytest.approx((10 - 7 - 1 / 6) * 6)
        assert (await red.snapshot([roll], t0 + 65))["r"] == CounterState(40, 0)
        assert (await red.snapshot([roll], t0 + 66))["r"] == CounterState(0, 0)  # rolled out
        assert await red.mark_fired("b", "80", t0 + 3600) and not await red.mark_fired("b", "80", t0 + 3600)
    finally:
        await red.close()
        await drop_prefix(prefix)


# ---- racing replicas ----------------------------------------------------------------------------

RACE_KEY = "race"
RACE_N = 500


def race_hold(limit: int, amount: int, now: float) -> Hold:
    return Hold(RACE_KEY, "budget", limit, amount, now + 3600)


def race_reserve(prefix: str, limit: int, jobs: list[tuple[str, int]], start_at: float) -> list[tuple[Any, ...]]:
    """One replica: its own process, pool and event loop, all its reservations in flight at once."""

    async def run() -> list[tuple[Any, ...]]:
        state = RedisState(REDIS_URL, prefix=prefix, timeout_s=5.0)
        await asyncio.sleep(max(0.0, start_at - time.time()))  # start all replicas together
        try:
            now = time.time()
            results = await asyncio.gather(
                *(state.reserve(rid, [race_hold(limit, amount, now)], now, ttl_s=600) for rid, amount in jobs)
            )
        finally:
            await state.close()
        return [(rid, amount, r.ok, r.states[RACE_KEY]) for (rid, amount), r in zip(jobs, results, strict=True)]

    return asyncio.run(run())


def race_settle(prefix: str, limit: int, jobs: list[tuple[str, int]]) -> list[dict[str, CounterState]]:
    async def run() -> list[dict[str, CounterState]]:
        state = RedisState(REDIS_URL, prefix=prefix, timeout_s=5.0)
        try:
            return await asyncio.gather(*(state.settle(rid, {RACE_KEY: used}, time.time()) for rid, used in jobs))
        finally:
            await state.close()

    return asyncio.run(run())


@pytest.fixture
def race_prefix(redis_url: str) -> Iterator[str]:
    prefix = f"margin-test:{uuid.uuid4().hex}:"
    yield prefix
    asyncio.run(drop_prefix(prefix))


def test_three_replicas_never_overspend(race_prefix: str) -> None:
    rng = random.Random(1234)
    jobs = [(f"rid-{i}", rng.randint(1, 1000)) for i in range(RACE_N)]
    limit = sum(a for _, a in jobs) // 3  # about a third fit: plenty of refusals to race on
    shards = [jobs[i::3] for i in range(3)]
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(3, mp_context=ctx) as pool:
        start_at = time.time() + 1.5
        reserved = [r for f in [pool.submit(race_reserve, race_prefix, limit, s, start_at) for s in shards]
                    for r in f.result()]
        wins = [(rid, amount) for rid, amount, ok, _ in reserved if ok]
        losses = [(amount, seen) for _, amount, ok, seen in reserved if not ok]
        assert len(reserved) == RACE_N and wins and losses
        held = sum(a for _, a in wins)
        assert held <= limit
        # Every refusal was justified by what Redis held at that moment, and reservations only grow
        # in this phase, so nothing was lost: the gap left is smaller than the smallest refusal.
        for amount, seen in losses:
            assert seen.spent + seen.reserved + amount > limit
        assert limit - held < min(a for a, _ in losses)

        async def peek() -> tuple[dict[str, CounterState], int]:
            state = RedisState(REDIS_URL, prefix=race_prefix)
            client = redis.asyncio.Redis.from_url(REDIS_URL)
            try:
                snap = await state.snapshot([race_hold(limit, 0, time.time())], time.time())
                return snap, int(await client.hlen(f"{race_prefix}r:{RACE_KEY}"))
            finally:
                await state.close()
                await client.aclose()

        snap, live = asyncio.run(peek())
        assert snap[RACE_KEY] == CounterState(0, held) and live == len(wins)

        actual = [(rid, rng.randint(0, amount)) for rid, amount in wins]
        settled = [r for f in [pool.submit(race_settle, race_prefix, limit, actual[i::3]) for i in range(3)]
                   for r in f.result()]
    assert all(RACE_KEY in r for r in settled) and len(settled) == len(wins)
    snap, live = asyncio.run(peek())
    spent = sum(u for _, u in actual)
    assert snap[RACE_KEY] == CounterState(spent, 0) and live == 0
    assert spent <= limit


# ---- Redis down ---------------------------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_flags_are_shared_and_expire(redis_url: str) -> None:
    prefix = f"margin-test:{uuid.uuid4().hex}:"
    a, b = RedisState(REDIS_URL, prefix=prefix), RedisState(REDIS_URL, prefix=prefix)  # two replicas
    mem = MemoryState()
    try:
        now = time.time()
        for setter, getter in ((a, b), (mem, mem)):
            assert not await getter.flagged("ui:signed-out:n1", now)
            await setter.flag("ui:signed-out:n1", now + 0.3)
            assert await getter.flagged("ui:signed-out:n1", time.time())
            assert not await getter.flagged("ui:signed-out:n2", time.time())
        await asyncio.sleep(0.4)
        assert not await b.flagged("ui:signed-out:n1", time.time())  # gone when it expires
        assert not await mem.flagged("ui:signed-out:n1", time.time())
    finally:
        await a.close()
        await b.close()
        await drop_prefix(prefix)


async def test_shared_semantic_entries_skip_own_expired_and_malformed(redis_url: str) -> None:
    import numpy as np

    from margin.state.cache import CachedAnswer
    from margin.state.semantic_share import SharedEntries, SharedEntry

    stream = f"margin-test:{uuid.uuid4().hex}:semantic"
    a = SharedEntries(REDIS_URL, 100, stream=stream, block_ms=100)
    b = SharedEntries(REDIS_URL, 100, stream=stream, block_ms=100)
    raw = redis.asyncio.Redis.from_url(REDIS_URL)
    try:
        now = time.time()
        vec = np.arange(4, dtype=np.float32)

        def entry(text: str, expires: float) -> SharedEntry:
            return SharedEntry("org:acme", "ctx", text, vec, CachedAnswer("m", body='{"x": 1}'), expires)

        await a.publish(entry("kept", now + 60))
        await a.publish(entry("expired", now - 1))
        await raw.xadd(stream, {"o": "someone", "t": "org:acme"})  # malformed: fields missing
        await a.publish(entry("after the bad one", now + 60))
        got = await b.follow(time.time())
        assert [e.text for e in got] == ["kept", "after the bad one"] and b.skipped == 1
        assert np.array_equal(got[0].vector, vec) and got[0].answer.body == '{"x": 1}'
        assert await a.follow(time.time()) == []  # its own entries are already in its index
        assert await b.follow(time.time()) == []  # nothing new: the read position moved on
    finally:
        await raw.delete(stream)
        await raw.aclose()
        await a.close()
        await b.close()


async def test_closed_port_raises_state_unavailable_promptly() -> None:
    state = RedisState(f"redis://127.0.0.1:{closed_port()}/0")
    hold = Hold("b", "budget", 100, 1, time.time() + 60)
    t = time.monotonic()
    try:
        with pytest.raises(StateUnavailable, match="unavailable"):
            await state.reserve("x", [hold], time.time(), 10)
        with pytest.raises(StateUnavailable):
            await state.settle("x", {}, time.time())
        with pytest.raises(StateUnavailable):
            await state.snapshot([hold], time.time())
        with pytest.raises(StateUnavailable):
            await state.add_spent(hold, 1, time.time())
        with pytest.raises(StateUnavailable):
            await state.mark_fired("b", "80", time.time() + 60)
        with pytest.raises(StateUnavailable):
            await state.flagged("ui:signed-out:x", time.time())
    finally:
        await state.close()
    assert time.monotonic() - t < 2.0


async def test_silent_server_times_out_as_state_unavailable() -> None:
    """A peer that accepts connections and never answers (a hung Redis): the timeout applies."""
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    state = RedisState(f"redis://127.0.0.1:{port}/0", timeout_s=0.3)
    t = time.monotonic()
    try:
        with pytest.raises(StateUnavailable):
            await state.snapshot([Hold("b", "budget", 100, 1, time.time() + 60)], time.time())
    finally:
        await state.close()
        server.close()
    assert time.monotonic() - t < 2.0
