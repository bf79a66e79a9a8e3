"""Security (issue 10): who gets in, what a request may ask for, what margin keeps.

Each test names the threat of docs/security.md it covers."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import sqlite3
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from margin.domain import Attribution, Call
from margin.gateway.payloads import PayloadLog, redact, redact_obj
from tests.conftest import (
    Gateway,
    Mock,
    drop_pg_database,
    gateway_config,
    new_pg_database,
    require_postgres,
    start_gateway,
    stop,
)

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


def post(gw: Gateway, key: str, body: dict[str, Any], **headers: str) -> httpx.Response:
    return httpx.post(gw.base_url + "/chat/completions", json=body, timeout=30,
                      headers={"Authorization": f"Bearer {key}", **headers})


# --- secrets in payloads: redaction (threat: upstream key leakage, prompts kept) ---------------

@pytest.mark.parametrize(("secret", "kind"), [
    ("sk-proj-AbCdEf0123456789xyzXYZ_-abc", "api_key"),
    ("sk-ant-api03-AAAAAAAAAAAAAAAAAAAAAAAA", "api_key"),
    ("mk-" + "Q" * 43, "api_key"),
    ("AKIAIOSFODNN7EXAMPLE", "aws_access_key"),
    ("Bearer eyJhbGciOiJIUzI1NiJ9abcdef", "bearer_token"),
    ("eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U", "jwt"),
    ("ana.garcia+billing@example.co.uk", "email"),
    ("ghp_" + "a1B2" * 9, "github_token"),
    ("xoxb-123456789012-abcdefghij", "slack_token"),
    ("AIza" + "B" * 35, "google_api_key"),
    ("-----BEGIN RSA PRIVATE KEY-----\nMIIEow\n-----END RSA PRIVATE KEY-----", "private_key"),
])
def test_each_kind_of_secret_is_redacted(secret: str, kind: str) -> None:
    out = redact(f"before {secret} after")
    assert secret not in out and f"[REDACTED:{kind}]" in out
    assert out.startswith("before ") and out.endswith(" after")


def test_redaction_leaves_ordinary_text_and_walks_json() -> None:
    text = "Ask about sk-learn, the task-queue, AKIA (an acronym) and the @channel mention."
    assert redact(text) == text
    body = {"model": "m", "user": "bob@corp.com", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "my key is sk-" + "x" * 30}]}],
        "tools": [{"function": {"arguments": '{"token": "AKIAABCDEFGHIJKLMNOP"}'}}]}
    out = redact_obj(body)
    flat = str(out)
    assert "bob@corp.com" not in flat and "x" * 30 not in flat and "AKIAABCDEFGHIJKLMNOP" not in flat
    assert out["model"] == "m" and out["messages"][0]["role"] == "user"


def _call(tags: tuple[tuple[str, str], ...]) -> Call:
    return Call(endpoint="chat", requested_model="m", stream=False, attribution=Attribution(key_id="k", tags=tags))


async def _payload_roundtrip(url: str) -> list[tuple[str, str]]:
    from margin.ledger import open_store

    store = open_store(url)
    await store.open()  # migrates: the payloads table (version 5)
    log = PayloadLog(url)
    await log.start()
    ids = ["0190d6a2-0000-7000-8000-00000000000" + str(i) for i in range(3)]
    log.capture(_call((("log_payloads", "true"),)), ids[0], {"messages": [{"role": "user",
                "content": "mail me at a@b.io, key sk-" + "z" * 24}]}, "sure, a@b.io")
    log.capture(_call(()), ids[1], {"messages": []}, "not opted in")
    log.capture(_call((("log_payloads", "false"),)), ids[2], {"messages": []}, "opted out")
    await log.flush()
    await log.close()
    await store.close()
    assert log.written == 1 and log.dropped == 0
    if url.startswith("sqlite"):
        conn = sqlite3.connect(url.removeprefix("sqlite:///"))
        rows = conn.execute("SELECT event_id, request || response FROM payloads").fetchall()
        conn.close()
        return [(str(a), str(b)) for a, b in rows]
    import asyncpg

    conn = await asyncpg.connect(url)
    rows = await conn.fetch("SELECT event_id::text, request::text || response::text FROM payloads")
    await conn.close()
    return [(r[0], r[1]) for r in rows]


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_payloads_stored_only_when_the_key_opts_in_and_redacted(backend: str, tmp_path: Path) -> None:
    if backend == "postgres":
        require_postgres()
        url = new_pg_database()
    else:
        url = f"sqlite:///{tmp_path}/ledger.db"
    try:
        rows = asyncio.run(_payload_roundtrip(url))
    finally:
        if backend == "postgres":
            drop_pg_database(url)
    assert len(rows) == 1
    event_id, text = rows[0]
    assert event_id.endswith("0")
    assert "a@b.io" not in text and "z" * 24 not in text
    assert "[REDACTED:email]" in text and "[REDACTED:api_key]" in text


# --- keys: SHA-256 only, constant-time, revocation on every replica within 1 s -----------------

@pytest.fixture
def two_replicas(mock_upstream: Mock, tmp_path: Path) -> Any:
    db = f"sqlite:///{tmp_path}/ledger.db"
    gws = []
    for i in range(2):
        d = tmp_path / f"r{i}"
        d.mkdir()
        cfg = gateway_config(d, mock_upstream.url, db, key_cache_ttl_s=5)
        gws.append(start_gateway(d, cfg))
    yield gws
    for g in gws:
        assert g.proc is not None
        stop(g.proc)


def test_keys_are_stored_as_sha256_only(two_replicas: list[Gateway], tmp_path: Path) -> None:
    k = two_replicas[0].create_key(team="t")
    conn = sqlite3.connect(tmp_path / "ledger.db")
    [(stored_hash, prefix)] = conn.execute("SELECT key_hash, prefix FROM keys WHERE key_id = ?", (k["key_id"],))
    dump = "\n".join(conn.iterdump())
    conn.close()
    assert stored_hash == hashlib.sha256(k["key"].encode()).hexdigest()
    assert k["key"] not in dump and len(prefix) < 16  # a display prefix, never enough to use
    listed = httpx.get(two_replicas[0].url + "/admin/keys", headers={"Authorization": "Bearer test-admin-key"}).text
    assert k["key"] not in listed and stored_hash not in listed


def test_revocation_reaches_every_replica_within_one_second(two_replicas: list[Gateway]) -> None:
    a, b = two_replicas
    k = a.create_key(team="revoke")
    for gw in (a, b):  # both replicas have the key cached (key_cache_ttl_s: 5 in the config)
        assert post(gw, k["key"], CHAT).status_code == 200
    r = httpx.delete(a.url + f"/admin/keys/{k['key_id']}", headers={"Authorization": "Bearer test-admin-key"})
    assert r.status_code == 200 and r.json()["active"] is False
    t0 = time.monotonic()
    assert post(a, k["key"], CHAT).status_code == 401  # the replica that revoked: at once
    while True:
        r = post(b, k["key"], CHAT)
        if r.status_code == 401:
            break
        assert time.monotonic() - t0 < 1.0, "the other replica still accepted a revoked key after 1 s"
        time.sleep(0.02)
    assert r.json()["error"]["code"] == "revoked_api_key"
    assert time.monotonic() - t0 < 1.0


def test_admin_api_needs_the_admin_key(two_replicas: list[Gateway]) -> None:
    gw = two_replicas[0]
    k = gw.create_key(team="t")
    for auth in (None, "Bearer wrong", f"Bearer {k['key']}", "Bearer test-admin-key-and-more", "Basic test-admin-key"):
        headers = {"Authorization": auth} if auth else {}
        for method, path in (("GET", "/admin/keys"), ("POST", "/admin/keys"), ("GET", "/admin/budgets"),
                             ("DELETE", f"/admin/keys/{k['key_id']}")):
            r = httpx.request(method, gw.url + path, headers=headers, json={})
            assert r.status_code == 401, (auth, method, path)
            assert r.json()["error"]["code"] == "invalid_admin_key"
    assert post(gw, k["key"], CHAT).status_code == 200  # nothing above revoked it


def test_admin_api_disabled_without_an_admin_key(mock_upstream: Mock, tmp_path: Path) -> None:
    cfg = gateway_config(tmp_path, mock_upstream.url, f"sqlite:///{tmp_path}/l.db")
    cfg["admin_key"] = None
    gw = start_gateway(tmp_path, cfg)
    try:
        r = httpx.get(gw.url + "/admin/keys", headers={"Authorization": "Bearer x"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "admin_disabled"
    finally:
        assert gw.proc is not None
        stop(gw.proc)


# --- request limits and header validation (threats: oversize input, log/metrics injection) -----

def test_request_limits(gateway: Gateway) -> None:
    k = gateway.create_key(team="limits", tags={"max_tokens": "50", "max_messages": "3"})
    r = post(gateway, k["key"], {**CHAT, "max_tokens": 51})
    assert r.status_code == 400 and r.json()["error"]["code"] == "max_tokens_too_large"
    assert "at most 50" in r.json()["error"]["message"]
    r = post(gateway, k["key"], {**CHAT, "messages": [{"role": "user", "content": "x"}] * 4})
    assert r.status_code == 400 and r.json()["error"]["code"] == "too_many_messages"
    assert post(gateway, k["key"], {**CHAT, "max_tokens": 50}).status_code == 200
    # No max_tokens: the key's ceiling is sent upstream, so the answer is bounded.
    body = {k2: v for k2, v in CHAT.items() if k2 != "max_tokens"}
    assert post(gateway, k["key"], body).status_code == 200
    # Oversize body (limits.max_body_bytes is 64 KiB in the test config): 413 before parsing.
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * 70_000}]}
    r = post(gateway, k["key"], big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_misconfigured_key_limit_fails_closed(gateway: Gateway) -> None:
    k = gateway.create_key(team="limits", tags={"max_tokens": "lots"})
    r = post(gateway, k["key"], CHAT)
    assert r.status_code == 403 and r.json()["error"]["code"] == "key_misconfigured"


@pytest.mark.parametrize(("header", "value", "code"), [
    ("X-Margin-Tags", "log_payloads=true", "invalid_tags"),  # policy tags belong to the key
    ("X-Margin-Tags", "max_tokens=999999", "invalid_tags"),
    ("X-Margin-Tags", "k=" + "v" * 200, "invalid_tags"),
    ("X-Margin-Tags", "k=a\tb", "invalid_tags"),
    ("X-Margin-Tags", ",".join(f"t{i}=v" for i in range(21)), "invalid_tags"),
    ("X-Margin-Tags", "bad key=v", "invalid_tags"),
    ("X-Margin-Run-Id", "r" * 300, "invalid_header"),
    ("X-Margin-Workflow", "a\x1b[31mred", "invalid_header"),
    ("X-Request-Id", "id\tforged", "invalid_header"),
])
def test_headers_are_validated(gateway: Gateway, header: str, value: str, code: str) -> None:
    k = gateway.create_key(team="headers")
    r = post(gateway, k["key"], CHAT, **{header: value})
    assert r.status_code == 400, r.text
    if "\x1b" in value:  # the HTTP parser itself refuses control characters other than TAB
        assert r.text == "Invalid HTTP request received."
    else:
        assert r.json()["error"]["code"] == code


def _raw_request(url: str, head: bytes) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(head)
        return s.recv(65536)


def test_no_injection_into_logs_or_metrics_labels(gateway: Gateway) -> None:
    """A newline cannot get into a header (the HTTP parser refuses it), nor a control character into a
    model name, tag or run header (400), so nothing a client sends can forge a log line or break the
    Prometheus exposition."""
    k = gateway.create_key(team="inject")
    body = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}],"max_tokens":2}'
    reply = _raw_request(gateway.url, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                         b"Authorization: Bearer " + k["key"].encode() + b"\r\n"
                         b"X-Request-Id: a\rINFO forged line\r\nContent-Type: application/json\r\n"
                         b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    assert reply.startswith(b"HTTP/1.1 400")
    r = post(gateway, k["key"], {**CHAT, "model": 'gpt"} evil_metric 1\nx{a="'})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_value"
    r = post(gateway, k["key"], {**CHAT, "model": 'gpt"}evil{'})  # printable: 404, and escaped in /metrics
    assert r.status_code == 404
    metrics = httpx.get(gateway.url + "/metrics").text
    from prometheus_client.parser import text_string_to_metric_families

    families = list(text_string_to_metric_families(metrics))  # parses: no line was injected
    assert not any(f.name.startswith("evil") for f in families)
    # Label values come from configuration only: a made-up model name never becomes a label.
    assert not [s for f in families for s in f.samples if any("evil" in v for v in s.labels.values())]
    log = gateway.log.read_text(errors="replace")
    assert "forged line" not in log and "evil_metric" not in log


# --- upstream key leakage ------------------------------------------------------------------------

class _EchoingUpstream:
    """A provider that, like some do, quotes the credential it got in its error message."""

    def __init__(self) -> None:
        import http.server
        import threading

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                auth = self.headers.get("Authorization", "")
                body = orjson.dumps({"error": {"message": f"Incorrect API key provided: {auth.removeprefix('Bearer ')}",
                                               "type": "invalid_request_error"}})
                self.send_response(401)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                return

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.mark.parametrize("upstream_key", ["sk-upstreamSECRET0123456789abcdef", "plain-token-no-known-shape-42"])
def test_upstream_key_never_reaches_clients_or_logs(upstream_key: str, tmp_path: Path) -> None:
    up = _EchoingUpstream()
    cfg = gateway_config(tmp_path, up.url, f"sqlite:///{tmp_path}/l.db")
    cfg["providers"][0]["api_key"] = upstream_key
    gw = start_gateway(tmp_path, cfg)
    try:
        k = gw.create_key(team="leak")
        r = post(gw, k["key"], CHAT)
        assert r.status_code == 502 and "Incorrect API key" in r.text
        assert upstream_key not in r.text
        rows = gw.events(k["key_id"], expect=1)
        assert upstream_key not in str(rows)
        assert upstream_key not in gw.log.read_text(errors="replace")
    finally:
        up.server.shutdown()
        assert gw.proc is not None
        stop(gw.proc)


# --- prompts and completions kept only on opt-in, redacted, nowhere else -------------------------

def _payload_rows(ledger_url: str) -> dict[str, str]:
    conn = sqlite3.connect(ledger_url.removeprefix("sqlite:///"))
    try:
        return {str(e): f"{req} {resp}" for e, req, resp in conn.execute("SELECT event_id, request, response "
                                                                        "FROM payloads")}
    finally:
        conn.close()


def test_payload_logging_is_opt_in_redacted_and_nowhere_else(mock_upstream: Mock, tmp_path: Path) -> None:
    gw = start_gateway(tmp_path, gateway_config(tmp_path, mock_upstream.url, f"sqlite:///{tmp_path}/l.db"))
    try:
        logged = gw.create_key(team="p", tags={"log_payloads": "true"})
        quiet = gw.create_key(team="p")
        marker = "zebra-quokka-marker"
        msg = {**CHAT, "messages": [{"role": "user", "content": f"{marker} write to eve@example.org using "
                                     "sk-live0123456789abcdefghij and AKIAIOSFODNN7EXAMPLE"}]}
        r1 = post(gw, logged["key"], msg)
        r2 = post(gw, quiet["key"], msg)
        r3 = httpx.post(gw.base_url + "/chat/completions", json={**msg, "stream": True}, timeout=30,
                        headers={"Authorization": f"Bearer {logged['key']}"})
        assert r1.status_code == r2.status_code == r3.status_code == 200
        gw.events(expect=3)
        deadline = time.monotonic() + 10
        rows: dict[str, str] = {}
        while time.monotonic() < deadline and len(rows) < 2:
            rows = _payload_rows(gw.ledger_url)
            time.sleep(0.2)
        assert set(rows) == {r1.headers["x-margin-event-id"], r3.headers["x-margin-event-id"]}
        for text in rows.values():
            assert marker in text  # the prompt is there ...
            assert "eve@example.org" not in text and "sk-live0123456789" not in text and "AKIAIOSFODNN7" not in text
            assert "[REDACTED:email]" in text and "[REDACTED:api_key]" in text
        assert marker not in gw.log.read_text(errors="replace")  # ... and nowhere else
        assert marker not in httpx.get(gw.url + "/metrics").text
        assert marker not in str(gw.events())
    finally:
        assert gw.proc is not None
        stop(gw.proc)


def test_viewer_keys_cannot_spend(gateway: Gateway) -> None:
    """A dashboard viewer key reads its team's spend in /ui; it may not call models or report outcomes."""
    viewer = gateway.create_key(team="support", tags={"role": "viewer"})
    r = post(gateway, viewer["key"], CHAT)
    assert r.status_code == 403 and r.json()["error"]["code"] == "viewer_key"
    r = httpx.post(gateway.base_url + "/outcomes", json={"run_id": "x", "status": "success"},
                   headers={"Authorization": f"Bearer {viewer['key']}"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "viewer_key"
