"""Kill the ledger store mid-traffic, bring it back: zero events lost, zero duplicated.

PostgreSQL: a private cluster (initdb) on its own port is stopped with `-m immediate` (a crash,
as far as the database is concerned) under load, then started again. SQLite: another process
holds an exclusive lock so every write fails, then lets go."""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.conftest import IN_CI, Gateway, Mock, free_port, gateway_config, start_gateway, stop

PG_BIN = next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin"))), None) if Path(
    "/usr/lib/postgresql").exists() else None
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "count me"}], "max_tokens": 2}


class PrivatePostgres:
    def __init__(self) -> None:
        if PG_BIN is None or not (PG_BIN / "initdb").exists():
            msg = "PostgreSQL server binaries (initdb, pg_ctl) are needed for the outage test"
            if IN_CI:
                pytest.fail(msg)
            pytest.skip(msg)
        self.dir = Path(tempfile.mkdtemp(prefix="margin-pg-", dir="/tmp"))
        self.port = free_port()
        shutil.chown(self.dir, "postgres", "postgres")
        self._pg("initdb", "-D", str(self.dir / "data"), "-A", "trust", "-U", "postgres", "--no-sync")
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _pg(self, tool: str, *args: str) -> None:
        assert PG_BIN is not None
        cmd = [str(PG_BIN / tool), *args]
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)

    def start(self) -> None:
        self._pg("pg_ctl", "-D", str(self.dir / "data"), "-l", str(self.dir / "log"), "-w", "-o",
                 f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off", "start")

    def crash(self) -> None:
        self._pg("pg_ctl", "-D", str(self.dir / "data"), "-m", "immediate", "-w", "stop")

    def destroy(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self.crash()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def private_pg() -> Iterator[PrivatePostgres]:
    pg = PrivatePostgres()
    pg.start()
    yield pg
    pg.destroy()


def traffic(gw: Gateway, key: str, n: int, outage: Callable[[], None], at: int) -> list[int]:
    """n requests from 8 workers; the outage callback runs once `at` requests have been sent."""
    statuses: list[int] = []
    lock = threading.Lock()
    fired = threading.Event()

    def one(i: int) -> None:
        if i == at and not fired.is_set():
            fired.set()
            threading.Thread(target=outage, daemon=True).start()
        r = httpx.post(gw.base_url + "/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {key}"},
                       timeout=30)
        with lock:
            statuses.append(r.status_code)
        time.sleep(0.01)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(n)))
    return statuses


def settle(gw: Gateway, key_id: str, n: int, timeout: float = 30) -> list[dict[str, object]]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            rows = gw.events(key_id)
        except Exception:
            rows = []
        if len(rows) >= n or time.monotonic() > deadline:
            return rows
        time.sleep(0.25)


def test_postgres_killed_mid_traffic_loses_nothing(private_pg: PrivatePostgres, mock_upstream: Mock,
                                                  tmp_path: Path) -> None:
    gw = start_gateway(tmp_path, gateway_config(tmp_path, mock_upstream.url, private_pg.url))
    try:
        k = gw.create_key(team="outage")

        def outage() -> None:
            private_pg.crash()
            time.sleep(3.0)
            private_pg.start()

        statuses = traffic(gw, k["key"], 600, outage, at=150)
        assert statuses.count(200) == 600  # the gateway kept serving while its ledger was down
        rows = settle(gw, k["key_id"], 600)
        assert len(rows) == 600
        assert len({r["event_id"] for r in rows}) == 600
        metrics = httpx.get(gw.url + "/metrics").text
        assert "margin_ledger_events_spooled" in metrics
        spooled = float(next(line.split()[-1] for line in metrics.splitlines()
                             if line.startswith("margin_ledger_events_spooled ")))
        assert spooled > 0, "the outage should have sent some events through the disk spool"
    finally:
        assert gw.proc is not None
        stop(gw.proc)


def test_sqlite_locked_mid_traffic_loses_nothing(mock_upstream: Mock, tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    gw = start_gateway(tmp_path, gateway_config(tmp_path, mock_upstream.url, f"sqlite:///{db}"))
    try:
        k = gw.create_key(team="locked")

        def outage() -> None:
            conn = sqlite3.connect(db, isolation_level=None, timeout=30)
            conn.execute("BEGIN EXCLUSIVE")
            time.sleep(4.0)
            conn.execute("ROLLBACK")
            conn.close()

        statuses = traffic(gw, k["key"], 400, outage, at=100)
        assert statuses.count(200) == 400
        rows = settle(gw, k["key_id"], 400)
        assert len(rows) == 400 and len({r["event_id"] for r in rows}) == 400
    finally:
        assert gw.proc is not None
        stop(gw.proc)


def test_gateway_starts_with_ledger_down_and_catches_up(mock_upstream: Mock, tmp_path: Path) -> None:
    pg = PrivatePostgres()  # initialised but not started: the store is down at start-up
    try:
        gw = start_gateway(tmp_path, gateway_config(tmp_path, mock_upstream.url, pg.url))
        try:
            # Keys live in the store too, so with no store nobody can authenticate: 401s, metered.
            r = httpx.post(gw.base_url + "/chat/completions", json=CHAT, headers={"Authorization": "Bearer mk-x"})
            assert r.status_code in (401, 503)
            pg.start()
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                if httpx.get(gw.url + "/health").json()["ledger"]["store_up"] == 1.0:
                    break
                time.sleep(0.3)
            k = gw.create_key(team="late")
            assert httpx.post(gw.base_url + "/chat/completions", json=CHAT,
                              headers={"Authorization": f"Bearer {k['key']}"}).status_code == 200
            assert len(settle(gw, k["key_id"], 1)) == 1
        finally:
            assert gw.proc is not None
            stop(gw.proc)
    finally:
        pg.destroy()
