"""Issue 10, short versions: a real cluster (3 replicas behind nginx, private PostgreSQL and Redis,
mock upstreams) under open-loop load while things break. Each test ends with a count. The full
versions (PostgreSQL down 60 s, a 10-minute soak) are `make soak` (bench/soak.py)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
from bench.cluster import Cluster, PrivateRedis, ServiceError, faults

from tests.conftest import IN_CI


def _require_binaries() -> None:
    missing = [b for b in ("nginx", "redis-server") if not shutil.which(b) and not shutil.which(f"/usr/sbin/{b}")]
    if not sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb")):
        missing.append("postgresql (initdb)")
    if missing:
        msg = f"the cluster harness needs {', '.join(missing)} (make services installs them)"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    _require_binaries()
    c = Cluster(faults.fault_spec(replicas=3))
    try:
        c.start()
    except ServiceError:
        c.stop()
        raise
    yield c
    c.stop()


def test_steady_load_across_three_replicas(cluster: Cluster) -> None:
    r = faults.steady(cluster, rps=40, duration_s=8, warmup_s=2, rss_every_s=1)
    assert r["server_errors"] == 0 and r["incomplete_streams"] == 0, r
    assert r["ledger"]["lost"] == 0 and r["ledger"]["duplicated"] == 0, r
    assert r["ledger"]["found"] == r["ledger"]["expected"] >= r["sent"]
    assert r["achieved_rps"] > 0.9 * 40 * 0.9  # 10% of the schedule goes direct to the mock
    served = [rep.health()["ledger"]["written"] for rep in cluster.replicas]
    assert all(n > 0 for n in served), f"nginx should spread load over every replica: {served}"


def test_upstream_faults_get_clear_errors_fallbacks_and_metering(cluster: Cluster) -> None:
    r = faults.upstream_faults(cluster)
    assert r["passed"], r["checks"]


def test_postgres_down_mid_load_loses_and_duplicates_nothing(cluster: Cluster) -> None:
    r = faults.postgres_outage(cluster, rps=30, duration_s=12, down_at_s=3, down_s=5)
    assert r["statuses"] == {"200": r["sent"]}, r  # served throughout: keys cached, ledger spooled
    assert r["spooled"] > 0, "the outage should have gone through the disk spool"
    assert r["ledger"] == {"expected": r["sent"], "found": r["sent"], "lost": 0, "duplicated": 0}, r


def test_redis_restart_keeps_budgets_within_limits(cluster: Cluster) -> None:
    r = faults.redis_restart(cluster, rps=20, duration_s=12, restart_at_s=2.5, limit_usd="0.07")
    assert Decimal(r["overshoot_usd"]) == 0, r
    assert r["rebuilds"] >= 1, r  # the counters were rebuilt from the ledger, not left at zero
    assert r["unexpected"] == 0 and r["late_503"] == 0, r  # only budget refusals, and 503s only in the outage
    assert r["blocked_at_end"], r
    assert Decimal(r["ledger_spent_usd"]) > Decimal("0.07") * Decimal("0.8"), r  # the budget was really used
    assert r["ledger"]["lost"] == 0 and r["ledger"]["duplicated"] == 0


@pytest.fixture(scope="module")
def kill_cluster() -> Iterator[Cluster]:
    _require_binaries()
    spec = faults.fault_spec(replicas=2)
    # Events wait up to 10 s in the writer's queue, so a SIGKILL certainly catches some there.
    spec.ledger_options = {"flush_interval_ms": 10000}
    spec.providers = [dict(p, timeout_s=2) if p["name"] == "steady" else p for p in spec.providers]
    spec.config = {**spec.config, "reservation_grace_s": 5}  # lapse after 2 + 5 s instead of 62 s
    c = Cluster(spec)
    try:
        c.start()
    except ServiceError:
        c.stop()
        raise
    yield c
    c.stop()


def test_replica_killed_mid_stream(kill_cluster: Cluster) -> None:
    r = faults.replica_kill(kill_cluster, victim=1, rps=20, duration_s=6, kill_at_s=0.5, limit_usd="1.00",
                            wait_release_s=40)
    assert Decimal(r["reserved_before_kill"]) > 0, r
    assert all(s.startswith("cut") for s in r["streams"]), r
    assert r["server_errors_after_kill"] == 0, r  # nginx sends new requests to the survivor
    assert r["journal_recovered"] >= 20, r  # events queued in the killed process came back from its journal
    assert r["cut_streams_in_ledger"] == len(r["streams"]), r  # calls in flight at the kill: one event each
    assert r["ledger"]["lost"] == 0 and r["ledger"]["duplicated"] == 0, r
    # The dead replica's reservations lapse (provider timeout 2 s + grace 5 s): nothing stays held.
    assert r["released_after_s"] is not None and Decimal(r["reserved_final"]) == 0, r


# --- the pieces, without a cluster ---------------------------------------------------------------

_KILLED_WRITER = """
import asyncio, os, signal, sys
from datetime import UTC, datetime
from margin.domain import Attribution, Event
from margin.ledger import LedgerWriter, Spool, open_store

async def main(url, spool, n):
    store = open_store(url)
    await store.open()
    w = LedgerWriter(store, Spool(spool), flush_interval_s=30)  # nothing reaches the store in time
    await w.start()
    now = datetime.now(UTC)
    for i in range(n):
        w.append(Event(event_id=f"0190d6a2-0000-7000-8000-{i:012d}", ts_start=now, ts_end=now, request_id=str(i),
                       endpoint="chat", attribution=Attribution(team="t"), requested_model="m"))
    await asyncio.sleep(0.2)
    os.kill(os.getpid(), signal.SIGKILL)

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
"""


def test_events_queued_in_a_killed_writer_are_replayed_from_its_journal(tmp_path: Path) -> None:
    import asyncio
    import signal
    import subprocess
    import sys

    from margin.ledger import LedgerWriter, Spool, open_store

    url, spool = f"sqlite:///{tmp_path}/ledger.db", tmp_path / "spool"
    p = subprocess.run([sys.executable, "-c", _KILLED_WRITER, url, str(spool), "300"], timeout=60)
    assert p.returncode == -signal.SIGKILL
    assert list(spool.glob("journal-*.jsonl")), "the killed writer should have left its journal"

    async def restart() -> tuple[int, int]:
        store = open_store(url)
        await store.open()
        assert await store.count_events() == 0  # the queue died with the process
        w = LedgerWriter(store, Spool(spool), flush_interval_s=0.01, retry_interval_s=0.1)
        await w.start()
        for _ in range(100):
            if await store.count_events() >= 300:
                break
            await asyncio.sleep(0.05)
        await w.close()
        n = await store.count_events()
        await store.close()
        return n, w.stats.recovered

    n, recovered = asyncio.run(restart())
    assert (n, recovered) == (300, 300)
    assert not list(spool.glob("journal-*.jsonl")) and not list(spool.glob("journal-*.lock"))


_KILLED_IN_FLIGHT = """
import asyncio, dataclasses, os, signal, sys
from datetime import UTC, datetime
from margin.domain import Attribution, Event
from margin.ledger import LedgerWriter, Spool, open_store

def ev(i, status=200):
    now = datetime.now(UTC)
    return Event(event_id=f"0190d6a2-0000-7000-8000-{i:012d}", ts_start=now, ts_end=now, request_id=str(i),
                 endpoint="chat", attribution=Attribution(team="t"), requested_model="m", status=status)

async def main(url, spool):
    store = open_store(url)
    await store.open()
    w = LedgerWriter(store, Spool(spool), flush_interval_s=0.01)  # rows reach the store at once
    await w.start()
    w.begin(dataclasses.replace(ev(1), status=500, error_type="replica_lost"))  # still in flight at the kill
    for i in range(100, 400):
        w.append(ev(i))
    w.begin(dataclasses.replace(ev(2), status=500, error_type="replica_lost"))
    w.append(ev(2))  # this one finished: its own row follows the provisional one
    await asyncio.sleep(1.0)  # everything appended is stored; the journal must still hold event 1
    os.kill(os.getpid(), signal.SIGKILL)

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


def test_a_call_in_flight_when_the_process_dies_is_in_the_ledger(tmp_path: Path) -> None:
    """The provider may bill a call the gateway never saw end: its provisional row comes back."""
    import asyncio
    import signal
    import subprocess
    import sys

    from margin.ledger import LedgerWriter, Spool, open_store

    url, spool = f"sqlite:///{tmp_path}/ledger.db", tmp_path / "spool"
    p = subprocess.run([sys.executable, "-c", _KILLED_IN_FLIGHT, url, str(spool)], timeout=60)
    assert p.returncode == -signal.SIGKILL

    async def restart() -> dict[str, dict[str, object]]:
        store = open_store(url)
        await store.open()
        assert await store.count_events() == 301  # the finished calls were stored before the kill
        w = LedgerWriter(store, Spool(spool), flush_interval_s=0.01, retry_interval_s=0.1)
        await w.start()
        for _ in range(100):
            if await store.count_events() >= 302:
                break
            await asyncio.sleep(0.05)
        await w.close()
        rows = {r["request_id"]: r for r in await store.fetch_events()}
        await store.close()
        return rows

    rows = asyncio.run(restart())
    assert len(rows) == 302
    assert (rows["1"]["status"], rows["1"]["error_type"]) == (500, "replica_lost")  # cut by the death
    assert (rows["2"]["status"], rows["2"]["error_type"]) == (200, None)  # finished: its own row stands


def test_racing_rebuilds_count_the_ledger_once_and_restore_in_flight_reservations(tmp_path: Path) -> None:
    import asyncio
    import contextlib
    import time

    from margin.domain.budget import Hold
    from margin.state.base import StateUnavailable
    from margin.state.redis import RedisState, StateNotReady

    _require_binaries()
    redis = PrivateRedis(tmp_path)
    redis.start()
    try:
        async def scenario() -> None:
            a, b = RedisState(redis.url), RedisState(redis.url)
            for s in (a, b):
                s.require_ready = True
            now = time.time()
            hold = Hold("b:team:t", "budget", 1000, 0, now + 3600, 0.0, "usd")
            with pytest.raises(StateNotReady):  # an empty Redis refuses reservations ...
                await a.reserve("r0", [Hold(hold.key, "budget", 1000, 10, now + 3600)], now, 60)
            # ... until one replica rebuilds; the second, racing, adds nothing.
            done = await asyncio.gather(a.rebuild([(hold, 400)], now, "a"), b.rebuild([(hold, 400)], now, "b"))
            assert sorted(done) == [False, True]
            ok = await a.reserve("r1", [Hold(hold.key, "budget", 1000, 100, now + 3600)], now, 60)
            assert ok.ok and ok.states[hold.key].spent == 400 and a.inflight == 1
            redis.restart()  # empty again, with r1 still in flight on replica a
            for s in (a, b):  # pooled connections to the old server fail once (the reconciler just retries)
                with contextlib.suppress(StateUnavailable):
                    await s.is_ready()
            assert not await a.is_ready()
            assert await a.restore_inflight(time.time()) == 1
            assert await a.rebuild([(hold, 400)], time.time(), "a")
            snap = await b.snapshot([hold], time.time())
            assert (snap[hold.key].spent, snap[hold.key].reserved) == (400, 100)  # spend and the live hold
            await a.settle_many([("r1", {hold.key: 60}, time.time())])
            snap = await b.snapshot([hold], time.time())
            assert (snap[hold.key].spent, snap[hold.key].reserved) == (460, 0) and a.inflight == 0
            await a.close()
            await b.close()

        asyncio.run(scenario())
    finally:
        redis.stop()
