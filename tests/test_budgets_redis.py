"""Budgets shared by several gateway processes through Redis: exact under concurrency, and the
configured behaviour when Redis is unreachable."""

from __future__ import annotations

import asyncio
import random
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import IN_CI, Gateway, Mock, free_port, gateway_config, start_gateway, stop
from tests.test_budgets_gateway import PREMIUM, chat

REDIS = "redis://127.0.0.1:6379/14"


@pytest.fixture(autouse=True)
def redis_available() -> None:
    import redis

    try:
        redis.Redis.from_url(REDIS, socket_timeout=2).ping()
    except redis.exceptions.ConnectionError:
        if IN_CI:
            pytest.fail("Redis is required in CI and is not reachable on 127.0.0.1:6379")
        pytest.skip("Redis not reachable on 127.0.0.1:6379")


def cluster(tmp: Path, mock: Mock, n: int, **extra: Any) -> list[Gateway]:
    """n gateways sharing one PostgreSQL-free setup: one SQLite ledger file each would split the
    ledger, so they share one SQLite file (WAL, busy timeout) and one Redis."""
    cfg = gateway_config(tmp, mock.url, f"sqlite:///{tmp}/ledger.db", **extra)
    cfg["models"].append(PREMIUM)
    out = []
    for i in range(n):
        d = tmp / f"gw{i}"
        d.mkdir()
        c = dict(cfg, ledger={**cfg["ledger"], "spool_dir": str(d / "spool")})
        out.append(start_gateway(d, c))
    return out


def test_three_replicas_sharing_redis_hold_one_dollar(mock_upstream: Mock, tmp_path: Path) -> None:
    budget_id = "dollar-" + uuid.uuid4().hex[:8]  # fresh counters on the shared Redis
    gws = cluster(tmp_path, mock_upstream, 3, state=REDIS,
                  budgets=[{"id": budget_id, "limit_usd": "1.00", "scope": {"team": "burst"}, "period": "day"}])
    try:
        k = gws[0].create_key(team="burst")
        rng = random.Random(5)

        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=500)) as c:
                return list(await asyncio.gather(*(
                    c.post(gws[i % 3].base_url + "/chat/completions",
                           headers={"Authorization": f"Bearer {k['key']}", "X-Mock-Output-Tokens": "200"},
                           json={"model": "premium", "max_tokens": rng.randint(1, 200),
                                 "messages": [{"role": "user", "content": "word " * rng.randint(1, 50)}]})
                    for i in range(500))))

        responses = asyncio.run(burst())
        codes = [r.status_code for r in responses]
        assert set(codes) <= {200, 429} and codes.count(200) > 50 and codes.count(429) > 0
        assert all(r.json()["error"]["code"] == "budget_exceeded" for r in responses if r.status_code == 429)
        rows = gws[0].events(k["key_id"], expect=500, timeout=30)
        assert len(rows) == 500
        settled = sum(Decimal(r["cost_usd"]) for r in rows)
        assert Decimal("0.5") < settled <= Decimal("1.00")
        # Every replica served some of it, and they agree on the state.
        admin = {"Authorization": f"Bearer {gws[0].admin_key}"}
        spent = {httpx.get(g.url + f"/admin/budgets/{budget_id}", headers=admin).json()["counters"][0]["spent"]
                 for g in gws}
        assert len(spent) == 1 and Decimal(spent.pop()) >= settled
    finally:
        for g in gws:
            assert g.proc is not None
            stop(g.proc)


def test_redis_unreachable_fail_closed(mock_upstream: Mock, tmp_path: Path) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    [gw] = cluster(tmp_path, mock_upstream, 1, state=dead, state_failure="closed",
                   budgets=[{"id": "b", "limit_usd": "10", "scope": {"team": "t"}}])
    try:
        k = gw.create_key(team="t")
        r = chat(gw, k["key"])
        assert r.status_code == 503 and r.json()["error"]["code"] == "budget_state_unavailable"
        other = gw.create_key(team="no-budget")
        assert chat(gw, other["key"]).status_code == 200  # calls no budget covers are unaffected
    finally:
        assert gw.proc is not None
        stop(gw.proc)


def test_redis_unreachable_fail_open_with_bounded_allowance(mock_upstream: Mock, tmp_path: Path) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    [gw] = cluster(tmp_path, mock_upstream, 1, state=dead, state_failure="open", fail_open_allowance_usd="0.003",
                   budgets=[{"id": "b", "limit_usd": "10", "scope": {"team": "t"}}])
    try:
        k = gw.create_key(team="t")
        codes = [chat(gw, k["key"], model="premium").status_code for _ in range(40)]
        assert codes[0] == 200 and 429 in codes  # served locally, then the allowance ran out
        rows = gw.events(k["key_id"], expect=40)
        assert sum(Decimal(r["cost_usd"]) for r in rows) <= Decimal("0.003")
    finally:
        assert gw.proc is not None
        stop(gw.proc)
