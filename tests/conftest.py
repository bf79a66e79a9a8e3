"""Real parts, really started: the mock upstream and the gateway run as subprocesses on loopback;
the ledger is a real SQLite file or a real PostgreSQL database."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import yaml

from margin.ledger import open_store

PY = sys.executable
# The project's data sets sit beside the repository (CI clones it with shared/ next to it).
SHARED_DATA = Path(os.environ.get("MARGIN_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
PG_ADMIN_URL = os.environ.get("MARGIN_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout: float = 30.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            if httpx.get(url, timeout=1.0).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def pg_available() -> bool:
    async def probe() -> bool:
        import asyncpg

        try:
            conn = await asyncpg.connect(PG_ADMIN_URL, timeout=3)
        except Exception:
            return False
        await conn.close()
        return True

    return asyncio.run(probe())


def require_postgres() -> None:
    if not pg_available():
        if IN_CI:
            pytest.fail(f"PostgreSQL is required in CI and is not reachable at {PG_ADMIN_URL}")
        pytest.skip(f"PostgreSQL not reachable at {PG_ADMIN_URL}")


def new_pg_database() -> str:
    """A fresh database per test session, so runs never see each other's rows."""
    import asyncpg

    name = f"margin_test_{uuid.uuid4().hex[:10]}"

    async def create() -> None:
        conn = await asyncpg.connect(PG_ADMIN_URL)
        await conn.execute(f'CREATE DATABASE "{name}"')
        await conn.close()

    asyncio.run(create())
    return PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name


def drop_pg_database(url: str) -> None:
    import asyncpg

    name = url.rsplit("/", 1)[1]

    async def drop() -> None:
        conn = await asyncpg.connect(PG_ADMIN_URL)
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.close()

    asyncio.run(drop())


@dataclass
class Mock:
    url: str
    proc: subprocess.Popen[bytes]

    def last_request(self) -> dict[str, Any]:
        data: dict[str, Any] = httpx.get(self.url.removesuffix("/v1") + "/mock/last_request").json()
        return data


def start_mock(port: int, **options: Any) -> Mock:
    args = ", ".join(f"{k}={v!r}" for k, v in options.items())
    code = (
        f"from margin.providers.mock_upstream import serve, MockOptions; "
        f"serve('127.0.0.1', {port}, MockOptions({args}))"
    )
    proc = subprocess.Popen([PY, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_http(f"http://127.0.0.1:{port}/health", proc=proc)
    return Mock(f"http://127.0.0.1:{port}/v1", proc)


@pytest.fixture(scope="session")
def mock_upstream() -> Iterator[Mock]:
    m = start_mock(free_port(), output_tokens=12, seed=7)
    yield m
    stop(m.proc)


@dataclass
class Gateway:
    url: str
    config: Path
    ledger_url: str
    admin_key: str
    proc: subprocess.Popen[bytes] | None
    log: Path

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def create_key(self, **attrs: Any) -> dict[str, Any]:
        r = httpx.post(self.url + "/admin/keys", json=attrs, headers={"Authorization": f"Bearer {self.admin_key}"})
        assert r.status_code == 201, r.text
        data: dict[str, Any] = r.json()
        return data

    def events(
        self, key_id: str | None = None, expect: int | None = None, timeout: float = 10.0
    ) -> list[dict[str, Any]]:
        """Ledger rows (optionally of one key), waiting until `expect` of them are written."""
        deadline = time.monotonic() + timeout
        while True:
            rows = read_events(self.ledger_url)
            if key_id is not None:
                rows = [r for r in rows if r["key_id"] == key_id]
            if expect is None or len(rows) >= expect or time.monotonic() > deadline:
                return rows
            time.sleep(0.05)


def read_events(ledger_url: str) -> list[dict[str, Any]]:
    async def fetch() -> list[dict[str, Any]]:
        store = open_store(ledger_url)
        await store.open()
        try:
            return await store.fetch_events()
        finally:
            await store.close()

    # In a thread of its own so async tests (with a running loop) can call it too.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, fetch()).result()


def gateway_config(tmp: Path, mock_url: str, ledger_url: str, **extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "admin_key": "test-admin-key",
        "providers": [
            {
                "name": "mock",
                "kind": "openai",
                "base_url": mock_url,
                "api_key": "${MOCK_KEY:-sk-mock}",
                "forward_headers": ["x-mock-*"],
            },
            {
                "name": "mock-impatient",
                "kind": "openai",
                "base_url": mock_url,
                "timeout_s": 1.0,
                "forward_headers": ["x-mock-*"],
            },
        ],
        "models": [
            {"name": "gpt-4o-mini", "provider": "mock", "price": {"genai_prices": "openai/gpt-4o-mini"}},
            {"name": "gpt-4o", "provider": "mock", "price": {"genai_prices": "openai/gpt-4o"}},
            {"name": "o3-mini", "provider": "mock", "price": {"genai_prices": "openai/o3-mini"}},
            {
                "name": "claude-sonnet",
                "provider": "mock",
                "upstream_model": "claude-sonnet-4-5",
                "price": {"genai_prices": "anthropic/claude-sonnet-4-5"},
            },
            {
                "name": "house-model",
                "provider": "mock",
                "upstream_model": "llama-3.1-8b",
                "price": {"self_hosted": {"gpu_hour_usd": "3.60"}},
                "throughput": {"output_tokens_per_s": 100, "input_tokens_per_s": 1000},
                "power_watts": 700,
            },
            {
                "name": "impatient",
                "provider": "mock-impatient",
                "upstream_model": "gpt-4o-mini",
                "price": {"per_million": {"input": "1", "output": "2"}},
            },
        ],
        "ledger": {
            "url": ledger_url,
            "spool_dir": str(tmp / "spool"),
            "flush_interval_ms": 10,
            "retry_interval_s": 0.5,
        },
        "limits": {"max_body_bytes": 65536},
        # Tests of failures must not trip each other's circuit; test_routing tests the breaker itself.
        "circuit_breaker": {"failures": 1000},
        "retry": {"attempts": 2, "backoff_ms": 10},
    }
    cfg.update(extra)
    return cfg


def start_gateway(tmp: Path, cfg: dict[str, Any], port: int | None = None, args: Sequence[str] = ()) -> Gateway:
    port = port or free_port()
    path = tmp / "margin.yaml"
    path.write_text(yaml.safe_dump(cfg))
    log = tmp / f"gateway-{port}.log"
    proc = subprocess.Popen(
        [PY, "-m", "margin.cli.main", "serve", "--config", str(path), "--port", str(port), *args],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    wait_http(f"http://127.0.0.1:{port}/health", proc=proc)
    return Gateway(f"http://127.0.0.1:{port}", path, cfg["ledger"]["url"], cfg["admin_key"], proc, log)


BACKENDS = ["sqlite", "postgres"]


def fresh_ledger(backend: str, directory: Path, name: str = "margin.db") -> Iterator[str]:
    """A ledger URL nobody else uses: a new SQLite file, or a new PostgreSQL database dropped after."""
    if backend == "sqlite":
        yield f"sqlite:///{directory}/{name}"
        return
    require_postgres()
    url = new_pg_database()
    yield url
    drop_pg_database(url)


@pytest.fixture(scope="module", params=BACKENDS)
def ledger_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    yield from fresh_ledger(request.param, tmp_path_factory.mktemp("ledger"))


@pytest.fixture(scope="module")
def gateway(ledger_url: str, mock_upstream: Mock, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("gw")
    gw = start_gateway(tmp, gateway_config(tmp, mock_upstream.url, ledger_url))
    yield gw
    assert gw.proc is not None
    stop(gw.proc)


def jdump(obj: Any) -> bytes:
    return orjson.dumps(obj)
