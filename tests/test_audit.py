"""The audit log (issue 11): admin changes and configuration recorded, hash-chained, verifiable;
tampering detected by `margin audit verify`. SQLite and PostgreSQL, through a running gateway."""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import re
import sqlite3
import subprocess
import textwrap
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from margin.config import parse_config
from margin.gateway import audit as gw_audit
from margin.ledger.audit import GENESIS, AuditLog, chain_hash, make_record, verify
from tests.conftest import (
    PY,
    Gateway,
    Mock,
    drop_pg_database,
    gateway_config,
    new_pg_database,
    require_postgres,
    start_gateway,
    stop,
)

ADMIN = {"Authorization": "Bearer test-admin-key"}
BUDGET = {"id": "audit-b", "scope": {"team": "aud"}, "limit_usd": 5, "period": "month"}


# -- the chain, pure ------------------------------------------------------------------------------------

def _chain(n: int) -> list[dict[str, Any]]:
    out, prev = [], GENESIS
    for i in range(1, n + 1):
        rec = make_record(i, datetime(2026, 1, 1, tzinfo=UTC), prev, "admin", "key.update", f"key_{i}",
                          {"team": "a"}, {"team": f"b{i}"}, "10.0.0.1")
        out.append(rec)
        prev = rec["hash"]
    return out


def test_chain_verifies_and_names_the_first_bad_record() -> None:
    recs = _chain(5)
    assert verify(recs).ok and verify(recs).head_seq == 5 and verify([]).ok
    edited = [dict(r) for r in recs]
    edited[2]["after"] = '{"team":"evil"}'
    v = verify(edited)
    assert not v.ok and v.bad_seq == 3 and "do not match its hash" in v.reason and v.head_seq == 2
    # an attacker who also recomputes the edited record's hash is caught by the next record
    edited[2]["hash"] = chain_hash(edited[2]["prev_hash"], edited[2])
    v = verify(edited)
    assert not v.ok and v.bad_seq == 4 and "prev_hash does not match the hash of record 3" in v.reason
    v = verify([r for r in recs if r["seq"] != 3])
    assert not v.ok and v.bad_seq == 3 and "missing" in v.reason
    v = verify([recs[0], recs[2], recs[1]])
    assert not v.ok and v.bad_seq == 2
    # deleting the tail leaves a valid chain; an anchor kept elsewhere catches it
    assert verify(recs[:3]).ok
    v = verify(recs[:3], anchors={5: recs[4]["hash"]})
    assert not v.ok and v.bad_seq == 5 and "tail was deleted" in v.reason
    assert verify(recs, anchors={5: recs[4]["hash"]}).ok


def test_config_view_hides_secrets_and_diffs_by_name() -> None:
    base = {"admin_key": "super-admin-secret", "state": "redis://:redispw@127.0.0.1:6379/0",
            "providers": [{"name": "p", "kind": "openai", "base_url": "https://api.example.com/v1",
                           "api_key": "sk-" + "q" * 30}],
            "models": [{"name": "m1", "provider": "p", "price": {"per_million": {"input": "1", "output": "2"}}},
                       {"name": "m2", "provider": "p", "price": {"per_million": {"input": "3", "output": "4"}}}],
            "ledger": {"url": "postgresql://margin:dbpw@db:5432/margin"},
            "budgets": [{"id": "b", "scope": {"key": "key_1"}, "limit_usd": 5, "period": "month"}]}
    view = gw_audit.config_view(parse_config(base))
    text = orjson.dumps(view).decode()
    for secret in ("super-admin-secret", "redispw", "q" * 30, "dbpw"):
        assert secret not in text
    assert view["admin_key"] == "[REDACTED]" and view["budgets"][0]["scope"] == {"key": "key_1"}
    assert view["ledger"]["url"] == "postgresql://margin:[REDACTED]@db:5432/margin"
    changed = {**base, "models": list(reversed(base["models"])), "groups": [
        {"name": "auto", "candidates": ["m1", "m2"], "strategy": "cheapest"}]}
    changed["models"][0] = {**changed["models"][0], "price": {"per_million": {"input": "3", "output": "5"}}}
    before, after = gw_audit.diff(view, gw_audit.config_view(parse_config(changed)))
    # models are matched by name, so reordering them is no change; only m2's output price and the new group are
    assert before == {"models[m2].price.per_million.output": "4", "groups": []}
    assert after["models[m2].price.per_million.output"] == "5" and after["groups[auto].strategy"] == "cheapest"


# -- through a running gateway (SQLite and PostgreSQL) ----------------------------------------------------

def _audit(gw: Gateway, query: str = "") -> dict[str, Any]:
    r = httpx.get(gw.url + "/admin/audit" + query, headers=ADMIN, timeout=30)
    assert r.status_code == 200, r.text
    data: dict[str, Any] = r.json()
    return data


def _cli(gw: Gateway, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, "-m", "margin.cli.main", "audit", *args, "--config", str(gw.config)],
                          capture_output=True, text=True, timeout=120)


def test_admin_changes_are_recorded_with_who_and_where(gateway: Gateway) -> None:
    head = _audit(gateway)["head"]["seq"]
    k = gateway.create_key(team="aud", tags={"workflow": "kyc"})
    kid = k["key_id"]
    assert httpx.patch(gateway.url + f"/admin/keys/{kid}", json={"team": "aud2"}, headers=ADMIN).status_code == 200
    assert httpx.delete(gateway.url + f"/admin/keys/{kid}", headers=ADMIN).status_code == 200
    assert httpx.delete(gateway.url + f"/admin/keys/{kid}", headers=ADMIN).status_code == 200  # no change: no record
    assert httpx.put(gateway.url + "/admin/budgets/audit-b", json=BUDGET, headers=ADMIN).status_code == 200
    assert httpx.put(gateway.url + "/admin/budgets/audit-b", json={**BUDGET, "limit_usd": 9},
                     headers=ADMIN).status_code == 200
    assert httpx.delete(gateway.url + "/admin/budgets/audit-b", headers=ADMIN).status_code == 200
    body = _audit(gateway, "?limit=50&since=1h")
    new = [r for r in reversed(body["data"]) if r["seq"] > head]
    assert [(r["action"], r["target"]) for r in new] == [
        ("key.create", kid), ("key.update", kid), ("key.revoke", kid),
        ("budget.create", "audit-b"), ("budget.update", "audit-b"), ("budget.delete", "audit-b")]
    assert [r["seq"] for r in new] == list(range(head + 1, head + 7))
    assert all(r["actor"] == "admin" and r["address"] == "127.0.0.1" for r in new)
    create, update, revoke, b_create, b_update, b_delete = new
    assert create["before"] is None and create["after"]["team"] == "aud"
    assert create["after"]["tags"] == {"workflow": "kyc"}
    assert (update["before"]["team"], update["after"]["team"]) == ("aud", "aud2")
    assert revoke["before"]["active"] is True and revoke["after"]["active"] is False
    assert (b_update["before"]["limit_usd"], b_update["after"]["limit_usd"]) == ("5", "9")
    assert b_create["before"] is None and b_delete["after"] is None
    # never the key's secret or its hash
    key_hash = hashlib.sha256(k["key"].encode()).hexdigest()
    text = orjson.dumps(body).decode()
    assert k["key"] not in text and key_hash not in text and "key_hash" not in text
    # filters
    only = _audit(gateway, f"?target={kid}")["data"]
    assert {r["action"] for r in only} == {"key.create", "key.update", "key.revoke"}
    assert {r["action"] for r in _audit(gateway, "?action=budget.*")["data"]} >= {"budget.create", "budget.delete"}
    v = httpx.get(gateway.url + "/admin/audit/verify", headers=ADMIN).json()
    assert v["ok"] and v["head_seq"] == body["head"]["seq"] and v["head_hash"] == body["head"]["hash"]


def test_the_first_start_records_the_configuration(gateway: Gateway) -> None:
    first = _audit(gateway, "?target=config")["data"][-1]
    assert first["seq"] == 1 and first["action"] == "config.initial" and first["before"] is None
    assert first["after"]["config"]["admin_key"] == "[REDACTED]"
    assert "test-admin-key" not in orjson.dumps(first).decode()
    assert "margin serve" in first["actor"] and first["address"]


def test_the_audit_api_is_for_the_admin_only(gateway: Gateway) -> None:
    k = gateway.create_key(team="aud")
    r = httpx.get(gateway.url + "/admin/audit", headers={"Authorization": f"Bearer {k['key']}"})
    assert r.status_code == 401
    r = httpx.get(gateway.url + "/admin/audit?limit=0", headers=ADMIN)
    assert r.status_code == 400 and "limit" in r.json()["error"]["message"]
    r = httpx.get(gateway.url + "/admin/audit?since=yesterday", headers=ADMIN)
    assert r.status_code == 400 and "--since 'yesterday'" in r.json()["error"]["message"]
    # found by `make soak`'s fuzzing: a record number past 64 bits reached the database (500)
    for bad in ("48010271335865511078493421568", "0", "\u00b2"):
        r = httpx.get(gateway.url + "/admin/audit", params={"before_seq": bad}, headers=ADMIN)
        assert r.status_code == 400 and r.json()["error"]["param"] == "before_seq", (bad, r.text)
    assert httpx.post(gateway.url + "/admin/audit", headers=ADMIN).status_code == 405


def test_dashboard_changes_are_attributed_to_the_dashboard(gateway: Gateway) -> None:
    from tests.test_ui_access import _csrf, sign_in_http

    c, r = sign_in_http(gateway, "test-admin-key")
    assert r.status_code == 303
    page = c.get("/ui/keys")
    r = c.post("/ui/keys", data={"name": "from-ui", "team": "aud-ui", "csrf": _csrf(page.text)})
    assert r.status_code in (200, 201, 303), r.text[:300]
    rec = _audit(gateway, "?action=key.create&limit=1")["data"][0]
    assert rec["after"]["name"] == "from-ui" and rec["actor"] == "admin (dashboard)" and rec["address"] == "127.0.0.1"


def test_cli_lists_exports_and_verifies(gateway: Gateway, tmp_path: Path) -> None:
    gateway.create_key(team="aud-cli")
    r = _cli(gateway, "--json", "--action", "key.create", "--limit", "1")
    assert r.returncode == 0, r.stderr
    rows = orjson.loads(r.stdout)
    assert len(rows) == 1 and rows[0]["after"]["team"] == "aud-cli"
    r = _cli(gateway, "list", "--csv", "--limit", "3")
    table = list(csv.DictReader(io.StringIO(r.stdout)))
    assert r.returncode == 0 and len(table) == 3 and set(table[0]) >= {"seq", "actor", "before", "after", "hash"}
    r = _cli(gateway, "--since", "1h")
    assert r.returncode == 0 and "key.create" in r.stdout and "team: aud -> aud2" in r.stdout
    out = tmp_path / "audit.jsonl"
    r = _cli(gateway, "export", "--out", str(out), "--json")
    assert r.returncode == 0, r.stderr
    summary = orjson.loads(r.stdout)
    lines = out.read_text().splitlines()
    assert summary["records"] == len(lines) == summary["head_seq"]
    r = _cli(gateway, "verify", "--json")
    assert r.returncode == 0, r.stderr
    v = orjson.loads(r.stdout)
    assert v["ok"] and v["records"] >= len(lines)
    # the export verifies on its own, and against an anchor taken from it
    anchor = f"{summary['head_seq']}:{summary['head_hash']}"
    r = _cli(gateway, "verify", "--file", str(out), "--anchor", anchor)
    assert r.returncode == 0 and "audit chain verified" in r.stdout, r.stderr
    r = _cli(gateway, "verify", "--anchor", "3:nothex")
    assert r.returncode == 2 and "--anchor" in r.stderr


def _tamper(url: str, seq: int) -> str:
    """Try an UPDATE (refused by the trigger), then drop the guard as a determined attacker would and
    rewrite one record's `after`. Returns the refusal's message."""
    evil = '{"team":"nobody-changed-this"}'
    if url.startswith("sqlite"):
        conn = sqlite3.connect(url.removeprefix("sqlite:///"))
        try:
            try:
                conn.execute('UPDATE audit_log SET "after" = ? WHERE seq = ?', (evil, seq))
                refused = ""
            except sqlite3.DatabaseError as e:
                refused = str(e)
            conn.execute("DROP TRIGGER audit_log_no_update")
            conn.execute('UPDATE audit_log SET "after" = ? WHERE seq = ?', (evil, seq))
            conn.commit()
        finally:
            conn.close()
        return refused

    async def pg() -> str:
        import asyncpg

        conn = await asyncpg.connect(url)
        try:
            try:
                await conn.execute('UPDATE audit_log SET "after" = $1 WHERE seq = $2', evil, seq)
                refused = ""
            except asyncpg.PostgresError as e:
                refused = str(e)
            await conn.execute("ALTER TABLE audit_log DISABLE TRIGGER USER")
            await conn.execute('UPDATE audit_log SET "after" = $1 WHERE seq = $2', evil, seq)
            await conn.execute("ALTER TABLE audit_log ENABLE TRIGGER USER")
        finally:
            await conn.close()
        return refused

    return asyncio.run(pg())


def test_a_tampered_record_is_detected_by_verify(gateway: Gateway) -> None:
    """Last in this module: it breaks the gateway's chain on purpose."""
    assert _cli(gateway, "verify").returncode == 0
    target = _audit(gateway, "?action=key.update&limit=1")["data"][0]["seq"]
    refused = _tamper(gateway.ledger_url, target)
    assert "append-only" in refused
    r = _cli(gateway, "verify")
    assert r.returncode == 1
    assert f"audit chain broken at record {target}:" in r.stderr and "changed after it was written" in r.stderr
    r = _cli(gateway, "verify", "--json")
    assert r.returncode == 1 and orjson.loads(r.stdout)["bad_seq"] == target
    assert not httpx.get(gateway.url + "/admin/audit/verify", headers=ADMIN).json()["ok"]


# -- configuration across restarts -----------------------------------------------------------------------

def test_each_start_records_the_config_and_what_changed(mock_upstream: Mock, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"sqlite:///{tmp_path}/ledger.db"
    cfg = gateway_config(tmp_path, mock_upstream.url, url, budgets=[BUDGET])
    monkeypatch.setenv("MOCK_KEY", "sk-first-" + "a" * 24)
    for variant in ("initial", "changed", "same"):
        if variant == "changed":
            monkeypatch.setenv("MOCK_KEY", "sk-second-" + "b" * 24)  # a rotated secret is not shown
            cfg = {**cfg, "budgets": [{**BUDGET, "limit_usd": 7}],
                   "groups": [{"name": "auto", "candidates": ["gpt-4o-mini", "gpt-4o"], "strategy": "cheapest"}],
                   "run_caps": [{"id": "triage", "scope": {"workflow": "triage"}, "max_calls": 5}]}
        gw = start_gateway(tmp_path, cfg)
        try:
            recs = _audit(gw, "?target=config")["data"]
        finally:
            assert gw.proc is not None
            stop(gw.proc)
    assert [r["action"] for r in reversed(recs)] == ["config.initial", "config.changed", "config.unchanged"]
    changed = recs[1]
    assert changed["after"]["sections"] == ["budgets", "groups", "run_caps"]
    assert changed["before"]["changed"]["budgets[audit-b].limit_usd"] == "5"
    assert changed["after"]["changed"]["budgets[audit-b].limit_usd"] == "7"
    assert changed["after"]["changed"]["run_caps[triage].max_calls"] == 5
    assert changed["before"]["hash"] == recs[2]["after"]["hash"] and recs[0]["after"]["same_as_seq"] == recs[1]["seq"]
    text = orjson.dumps(recs).decode()
    assert "sk-first" not in text and "sk-second" not in text and "test-admin-key" not in text


# -- replicas appending at once never fork the chain ------------------------------------------------------

_APPENDER = textwrap.dedent("""
    import asyncio, sys
    from margin.ledger.audit import AuditLog
    async def main(url, who, n):
        log = AuditLog(url, pool_size=4)
        await log.open()
        await asyncio.gather(*(log.append(who, "key.update", f"k{i}", {"i": i}, {"i": i + 1}, "10.0.0.9")
                               for i in range(n)))
        await log.close()
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
""")


def _verified_records(url: str) -> tuple[Any, list[dict[str, Any]]]:
    """The chain's verification and every record, read back through a fresh AuditLog."""
    async def read() -> tuple[Any, list[dict[str, Any]]]:
        log = AuditLog(url)
        await log.open()
        try:
            return await log.verify(), [r async for r in log.scan()]
        finally:
            await log.close()

    return asyncio.run(read())


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_concurrent_replicas_append_one_chain(backend: str, tmp_path: Path) -> None:
    if backend == "postgres":
        require_postgres()
        url = new_pg_database()
    else:
        url = f"sqlite:///{tmp_path}/ledger.db"
    try:
        async def prepare() -> None:
            log = AuditLog(url)
            await log.open()  # migrate once, before the replicas race
            await log.close()

        asyncio.run(prepare())
        procs = [subprocess.Popen([PY, "-c", _APPENDER, url, f"replica-{i}", "40"]) for i in range(3)]
        assert [p.wait(120) for p in procs] == [0, 0, 0]

        v, recs = _verified_records(url)
    finally:
        if backend == "postgres":
            drop_pg_database(url)
    assert v.ok and v.records == 120, v
    assert [r["seq"] for r in recs] == list(range(1, 121))
    assert {r["actor"] for r in recs} == {"replica-0", "replica-1", "replica-2"}
    assert all(re.fullmatch(r"[0-9a-f]{64}", r["hash"]) for r in recs)


def test_cli_changes_can_be_audited_too(tmp_path: Path) -> None:
    """`margin keys` writes to the store directly; cli.audit.record_cli is its hook."""
    from margin.cli.audit import record_cli

    url = f"sqlite:///{tmp_path}/ledger.db"
    asyncio.run(record_cli(url, "key.create", "key_cli", None, {"team": "ops", "api_key": "sk-" + "s" * 30}))
    asyncio.run(record_cli(url, "key.revoke", "key_cli", {"active": True}, {"active": True}))  # no change

    v, recs = _verified_records(url)
    assert v.ok and len(recs) == 1 and recs[0]["actor"].endswith("(margin CLI)")
    assert orjson.loads(recs[0]["after"]) == {"team": "ops", "api_key": "[REDACTED]"}
