"""A margin cluster on one machine: N `margin serve` replicas on loopback behind a private nginx,
sharing a private PostgreSQL ledger and a private Redis, in front of mock upstreams.

    with Cluster(ClusterSpec(replicas=3)) as c:
        key = c.create_key(team="search")["key"]
        httpx.post(c.url + "/v1/chat/completions", ...)
        c.pg.crash(); c.pg.start()          # faults
        c.redis.restart()
        c.replicas[1].kill(); c.replicas[1].start()

Everything lives in one temporary directory (configs, spools, logs) that is removed on stop
unless `keep=True`. Used by tests/test_faults.py (short runs) and bench/soak.py (full runs)."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml
from bench.cluster.services import (
    PY,
    Nginx,
    PrivatePostgres,
    PrivateRedis,
    Proc,
    ServiceError,
    free_port,
    mock_proc,
)

ADMIN_KEY = "cluster-admin-key"
SHARED_PG = "postgresql://postgres@127.0.0.1:5432/postgres"

DEFAULT_MODELS: list[dict[str, Any]] = [
    {"name": "gpt-4o-mini", "provider": "steady", "price": {"genai_prices": "openai/gpt-4o-mini"}},
    {"name": "gpt-4o", "provider": "steady", "price": {"genai_prices": "openai/gpt-4o"}},
    # Round per-token prices, so budget arithmetic in tests is easy to follow.
    {"name": "premium", "provider": "steady", "upstream_model": "gpt-4o",
     "price": {"per_million": {"input": "5", "output": "40"}}},
]


@dataclass
class ClusterSpec:
    replicas: int = 3
    # "private": initdb a throwaway PostgreSQL (fault tests stop it); "shared": a fresh database on
    # the machine's 127.0.0.1:5432 (never stopped); "sqlite": one SQLite file (single machine only).
    ledger: str = "private"
    redis: str = "private"  # or a redis:// URL to use as it is (never restarted by the harness)
    nginx: bool = True
    mocks: dict[str, dict[str, Any]] = field(default_factory=lambda: {"steady": {"output_tokens": 16}})
    # Providers may name a mock instead of a base_url: {"name": "p", "mock": "steady", ...}.
    providers: list[dict[str, Any]] = field(default_factory=lambda: [{"name": "steady", "mock": "steady"}])
    models: list[dict[str, Any]] = field(default_factory=lambda: copy.deepcopy(DEFAULT_MODELS))
    config: dict[str, Any] = field(default_factory=dict)  # merged into every replica's margin.yaml
    ledger_options: dict[str, Any] = field(default_factory=dict)  # merged into `ledger:`
    workdir: Path | None = None
    keep: bool = False


@dataclass
class Replica:
    index: int
    port: int
    dir: Path
    config: Path
    proc: Proc | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 90.0, wait: bool = True) -> None:
        self.proc = Proc(f"replica-{self.index}", [PY, "-m", "margin.cli.main", "serve", "--config",
                                                     str(self.config), "--port", str(self.port)],
                         self.dir / "gateway.log")
        self.proc.start()
        if wait:
            self.wait(timeout_s)

    def wait(self, timeout_s: float = 90.0) -> None:
        assert self.proc is not None
        self.proc.wait_http(self.url + "/health", timeout_s)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()

    def health(self) -> dict[str, Any]:
        data: dict[str, Any] = httpx.get(self.url + "/health", timeout=5).json()
        return data

    def rss_kb(self) -> int:
        return self.proc.rss_kb() if self.proc is not None else 0


class Cluster:
    def __init__(self, spec: ClusterSpec | None = None):
        self.spec = spec or ClusterSpec()
        self.root = self.spec.workdir or Path(tempfile.mkdtemp(prefix="margin-cluster-", dir="/tmp"))
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)  # PostgreSQL runs as its own user and must reach its data directory
        self.pg: PrivatePostgres | None = None
        self.redis: PrivateRedis | None = None
        self.nginx: Nginx | None = None
        self.mocks: dict[str, tuple[Proc, str]] = {}
        self.replicas: list[Replica] = []
        self.ledger_url = ""
        self.state_url = ""
        self._shared_db = ""

    # -- lifecycle ------------------------------------------------------------------------------
    def __enter__(self) -> Cluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        s = self.spec
        self.ledger_url = self._start_ledger()
        if s.redis == "private":
            self.redis = PrivateRedis(self.root)
            self.redis.start()
            self.state_url = self.redis.url
        else:
            self.state_url = s.redis
        for name, options in s.mocks.items():
            port = free_port()
            proc = mock_proc(self.root, name, port, options)
            proc.start()
            self.mocks[name] = (proc, f"http://127.0.0.1:{port}/v1")
        for proc, url in self.mocks.values():
            proc.wait_http(url.removesuffix("/v1") + "/health", 30)
        cfg = self.replica_config()
        for i in range(s.replicas):
            d = self.root / f"replica-{i}"
            d.mkdir(exist_ok=True)
            c = copy.deepcopy(cfg)
            c["ledger"]["spool_dir"] = str(d / "spool")
            path = d / "margin.yaml"
            path.write_text(yaml.safe_dump(c, sort_keys=False))
            self.replicas.append(Replica(i, free_port(), d, path))
        # The first replica migrates the ledger; the others start together after it.
        self.replicas[0].start()
        for r in self.replicas[1:]:
            r.start(wait=False)
        for r in self.replicas[1:]:
            r.wait()
        if s.nginx:
            self.nginx = Nginx(self.root / "nginx", [r.port for r in self.replicas])
            self.nginx.start()

    def _start_ledger(self) -> str:
        s = self.spec
        if s.ledger == "private":
            self.pg = PrivatePostgres(self.root)
            self.pg.start()
            return self.pg.url
        if s.ledger == "shared":
            self._shared_db = f"margin_cluster_{uuid.uuid4().hex[:10]}"
            asyncio.run(_pg_exec(SHARED_PG, f'CREATE DATABASE "{self._shared_db}"'))
            return SHARED_PG.rsplit("/", 1)[0] + "/" + self._shared_db
        if s.ledger == "sqlite":
            return f"sqlite:///{self.root}/ledger.db"
        raise ServiceError(f"ledger must be private, shared or sqlite, not {s.ledger!r}")

    def replica_config(self) -> dict[str, Any]:
        s = self.spec
        providers = []
        for p in s.providers:
            p = dict(p)
            mock = p.pop("mock", None)
            if mock is not None:
                p["base_url"] = self.mocks[mock][1]
            p.setdefault("kind", "openai")
            p.setdefault("api_key", "sk-mock")
            p.setdefault("forward_headers", ["x-mock-*"])
            providers.append(p)
        cfg: dict[str, Any] = {
            "admin_key": ADMIN_KEY,
            "providers": providers,
            "models": s.models,
            "ledger": {"url": self.ledger_url, "spool_dir": "", "flush_interval_ms": 50, "retry_interval_s": 0.5,
                       **s.ledger_options},
            "state": self.state_url,
            "state_failure": "closed",
            "circuit_breaker": {"failures": 5, "cooldown_s": 5},
            "retry": {"attempts": 2, "backoff_ms": 20},
        }
        cfg.update(copy.deepcopy(s.config))
        return cfg

    def stop(self) -> None:
        for step in ([self.nginx.stop] if self.nginx else []) + [r.stop for r in self.replicas] + \
                [p.stop for p, _ in self.mocks.values()] + ([self.redis.stop] if self.redis else []) + \
                ([self.pg.destroy] if self.pg else []):
            with contextlib.suppress(Exception):
                step()
        if self._shared_db:
            with contextlib.suppress(Exception):
                asyncio.run(_pg_exec(SHARED_PG, f'DROP DATABASE IF EXISTS "{self._shared_db}" WITH (FORCE)'))
            self._shared_db = ""
        if not self.spec.keep:
            shutil.rmtree(self.root, ignore_errors=True)

    # -- use ------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        """Where clients go: nginx, or the first replica when there is no nginx."""
        return f"http://127.0.0.1:{self.nginx.port}" if self.nginx else self.replicas[0].url

    @property
    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {ADMIN_KEY}"}

    def create_key(self, **attrs: Any) -> dict[str, Any]:
        r = httpx.post(self.url + "/admin/keys", json=attrs, headers=self.admin, timeout=30)
        if r.status_code != 201:
            raise ServiceError(f"could not create a key: HTTP {r.status_code} {r.text}")
        data: dict[str, Any] = r.json()
        return data

    def put_budget(self, budget: dict[str, Any]) -> dict[str, Any]:
        r = httpx.put(self.url + f"/admin/budgets/{budget['id']}", json=budget, headers=self.admin, timeout=30)
        if r.status_code != 200:
            raise ServiceError(f"could not set budget {budget['id']}: HTTP {r.status_code} {r.text}")
        time.sleep(1.5)  # every replica reloads budget definitions within budget_refresh_s (1 s)
        data: dict[str, Any] = r.json()
        return data

    def budget_status(self, budget_id: str, replica: int | None = None) -> dict[str, Any]:
        base = self.replicas[replica].url if replica is not None else self.url
        data: dict[str, Any] = httpx.get(base + f"/admin/budgets/{budget_id}", headers=self.admin, timeout=30).json()
        return data

    def rss_kb(self) -> list[int]:
        return [r.rss_kb() for r in self.replicas]

    def wait_ledger_idle(self, timeout_s: float = 120.0) -> bool:
        """Until every live replica's writer has nothing queued or spooled and its store is up."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                states = [r.health()["ledger"] for r in self.replicas if r.proc and r.proc.alive()]
            except (httpx.HTTPError, ValueError):
                states = None
            if states is not None and all(s["queued"] == 0 and s["store_up"] == 1.0 for s in states) and \
                    all(_empty_spool(r.dir / "spool") for r in self.replicas):
                return True
            time.sleep(0.25)
        return False

    def ledger_counts(self, request_prefix: str) -> dict[str, int]:
        """How many ledger events each request id starting with `request_prefix` has."""
        return asyncio.run(_counts(self.ledger_url, request_prefix))

    def ledger_cost(self, team: str) -> str:
        """Exact total cost (decimal text) of the team's events."""
        return asyncio.run(_team_cost(self.ledger_url, team))


def _empty_spool(d: Path) -> bool:
    """No row waits in the spool (live or sealed files), and no killed writer's journal is left."""
    return all(p.stat().st_size == 0 for p in d.glob("spool-*"))


async def _pg_exec(url: str, sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def _counts(ledger_url: str, prefix: str) -> dict[str, int]:
    if ledger_url.startswith("sqlite"):
        import sqlite3

        conn = sqlite3.connect(ledger_url.removeprefix("sqlite:///"))
        try:
            rows = conn.execute("SELECT request_id, COUNT(*) FROM events WHERE request_id LIKE ? GROUP BY request_id",
                                (prefix + "%",)).fetchall()
        finally:
            conn.close()
        return {str(a): int(b) for a, b in rows}
    import asyncpg

    conn = await asyncpg.connect(ledger_url)
    try:
        rows = await conn.fetch("SELECT request_id, COUNT(*) FROM events WHERE request_id LIKE $1 GROUP BY request_id",
                                prefix + "%")
    finally:
        await conn.close()
    return {r[0]: int(r[1]) for r in rows}


async def _team_cost(ledger_url: str, team: str) -> str:
    if ledger_url.startswith("sqlite"):
        import sqlite3
        from decimal import Decimal

        conn = sqlite3.connect(ledger_url.removeprefix("sqlite:///"))
        try:
            rows = conn.execute("SELECT cost_usd FROM events WHERE team = ?", (team,)).fetchall()
        finally:
            conn.close()
        return str(sum((Decimal(r[0] or "0") for r in rows), Decimal(0)))
    import asyncpg

    conn = await asyncpg.connect(ledger_url)
    try:
        total = await conn.fetchval("SELECT COALESCE(SUM(cost_usd), 0) FROM events WHERE team = $1", team)
    finally:
        await conn.close()
    return str(total)
