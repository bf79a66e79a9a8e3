"""Bad input and failing upstreams: each gets an OpenAI-style error with a precise message and the
right status, and each is still metered."""

from __future__ import annotations

import socket
import time

import httpx
import openai
import orjson
import pytest

from tests.conftest import Gateway


def post(gw: Gateway, key: str | None, body: bytes | dict[str, object], path: str = "/v1/chat/completions",
         **headers: str) -> httpx.Response:
    h = {"Content-Type": "application/json", **headers}
    if key:
        h["Authorization"] = f"Bearer {key}"
    if isinstance(body, dict):
        return httpx.post(gw.url + path, json=body, headers=h, timeout=30)
    return httpx.post(gw.url + path, content=body, headers=h, timeout=30)


def error_of(r: httpx.Response) -> dict[str, object]:
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err  # type: ignore[no-any-return]


CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


@pytest.mark.parametrize(
    ("body", "status", "code", "param", "fragment"),
    [
        (b"{not json", 400, "invalid_json", None, "not valid JSON"),
        (b"", 400, "invalid_json", None, "empty"),
        (b"[1, 2]", 400, "invalid_json", None, "must be a JSON object"),
        ({"messages": [{"role": "user", "content": "x"}]}, 400, "missing_required_parameter", "model", "'model'"),
        ({"model": "gpt-4o-mini"}, 400, "missing_required_parameter", "messages", "'messages'"),
        ({"model": "gpt-4o-mini", "messages": []}, 400, "invalid_type", "messages", "non-empty"),
        ({"model": "gpt-4o-mini", "messages": [{"content": "x"}]}, 400, "invalid_type", "messages[0]", "role"),
        ({**CHAT, "max_tokens": -1}, 400, "invalid_value", "max_tokens", "positive integer"),
        ({**CHAT, "stream": "yes"}, 400, "invalid_type", "stream", "boolean"),
        ({**CHAT, "model": "gpt-9"}, 404, "model_not_found", "model", "'gpt-9' does not exist"),
    ],
)
def test_bad_requests(gateway: Gateway, body: bytes | dict[str, object], status: int, code: str,
                      param: str | None, fragment: str) -> None:
    k = gateway.create_key(team="bad-input")
    r = post(gateway, k["key"], body)
    assert r.status_code == status
    err = error_of(r)
    assert err["code"] == code and err["param"] == param and fragment in str(err["message"])
    [ev] = gateway.events(k["key_id"], expect=1)
    assert ev["status"] == status and ev["error_type"] == code and ev["team"] == "bad-input"
    assert ev["cost_usd"] in ("0", "0E-8") or float(ev["cost_usd"]) == 0


def test_unknown_missing_and_revoked_keys(gateway: Gateway) -> None:
    before = len(gateway.events())
    r = post(gateway, None, CHAT)
    assert r.status_code == 401 and error_of(r)["code"] == "invalid_api_key" and "Missing API key" in r.text
    r = post(gateway, "mk-not-a-real-key", CHAT)
    assert r.status_code == 401 and "Incorrect API key" in r.text
    k = gateway.create_key(team="revoked")
    assert post(gateway, k["key"], CHAT).status_code == 200
    d = httpx.delete(f"{gateway.url}/admin/keys/{k['key_id']}",
                     headers={"Authorization": f"Bearer {gateway.admin_key}"})
    assert d.status_code == 200 and d.json()["active"] is False
    r = post(gateway, k["key"], CHAT)
    assert r.status_code == 401 and error_of(r)["code"] == "revoked_api_key" and k["key_id"] in r.text
    evs = gateway.events(k["key_id"], expect=2)
    assert [e["status"] for e in sorted(evs, key=lambda e: e["ts_start"])] == [200, 401]
    assert len(gateway.events(expect=before + 4)) >= before + 4  # the unattributed 401s are metered too


def test_key_limited_to_models(gateway: Gateway) -> None:
    k = gateway.create_key(team="limited", models=["gpt-4o-mini"])
    assert post(gateway, k["key"], CHAT).status_code == 200
    r = post(gateway, k["key"], {**CHAT, "model": "gpt-4o"})
    assert r.status_code == 403 and error_of(r)["code"] == "model_not_allowed"
    ids = [m.id for m in openai.OpenAI(base_url=gateway.base_url, api_key=k["key"]).models.list()]
    assert ids == ["gpt-4o-mini"]


def test_oversize_body_is_413_and_metered(gateway: Gateway) -> None:
    k = gateway.create_key(team="big")
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * 70_000}]}
    r = post(gateway, k["key"], big)
    assert r.status_code == 413 and error_of(r)["code"] == "request_too_large" and "65536" in r.text
    [ev] = gateway.events(k["key_id"], expect=1)
    assert ev["status"] == 413 and ev["error_type"] == "request_too_large"


def test_bad_tags_header(gateway: Gateway) -> None:
    k = gateway.create_key(team="tags")
    r = post(gateway, k["key"], CHAT, **{"X-Margin-Tags": "workflow=kyc,oops"})
    assert r.status_code == 400 and error_of(r)["code"] == "invalid_tags" and "'oops'" in r.text


@pytest.mark.parametrize(
    ("headers", "model", "status", "code"),
    [
        ({"X-Mock-Status": "500"}, "gpt-4o-mini", 502, "upstream_error"),
        ({"X-Mock-Status": "503"}, "gpt-4o-mini", 502, "upstream_error"),
        ({"X-Mock-Status": "400"}, "gpt-4o-mini", 400, "upstream_rejected"),
        ({"X-Mock-Reset": "1"}, "gpt-4o-mini", 502, "upstream_connection_error"),
        ({"X-Mock-Invalid-Json": "1"}, "gpt-4o-mini", 502, "invalid_upstream_response"),
        ({"X-Mock-Hang": "1"}, "impatient", 504, "upstream_timeout"),
    ],
)
def test_upstream_failures(gateway: Gateway, headers: dict[str, str], model: str, status: int, code: str) -> None:
    k = gateway.create_key(team="upstream-faults")
    r = post(gateway, k["key"], {**CHAT, "model": model}, **headers)
    assert r.status_code == status, r.text
    err = error_of(r)
    assert err["code"] == code or (status == 400 and err["type"] == "invalid_request_error")
    # Transient failures are retried once (retry.attempts = 2): two events, the second linked to the first.
    n = 1 if status == 400 else 2
    evs = sorted(gateway.events(k["key_id"], expect=n), key=lambda e: e["ts_start"])
    assert len(evs) == n
    for ev in evs:
        assert ev["status"] == status and ev["error_type"] == err["code"] and ev["provider"] == "mock" + (
            "-impatient" if model == "impatient" else "")
    if n == 2:
        assert evs[1]["parent_event_id"] == evs[0]["event_id"] and evs[0]["parent_event_id"] is None
        assert evs[1]["request_id"] == evs[0]["request_id"]


def test_connection_refused_upstream_is_502(gateway: Gateway, tmp_path_factory: pytest.TempPathFactory) -> None:
    from tests.conftest import free_port, gateway_config, start_gateway, stop

    tmp = tmp_path_factory.mktemp("dead")
    dead = f"http://127.0.0.1:{free_port()}/v1"
    gw = start_gateway(tmp, gateway_config(tmp, dead, f"sqlite:///{tmp}/l.db"))
    try:
        k = gw.create_key(team="dead")
        r = post(gw, k["key"], CHAT)
        assert r.status_code == 502 and error_of(r)["code"] == "upstream_connection_error"
        assert "Upstream connection failed" in r.text
    finally:
        assert gw.proc is not None
        stop(gw.proc)


def test_stream_reset_midway_reports_error_and_meters_delivered_tokens(gateway: Gateway) -> None:
    k = gateway.create_key(team="reset")
    c = openai.OpenAI(base_url=gateway.base_url, api_key=k["key"], max_retries=0)
    got: list[str] = []
    with pytest.raises(openai.APIError, match="Upstream connection failed"):
        for ch in c.chat.completions.create(model="gpt-4o-mini", stream=True, max_tokens=10,
                                            messages=[{"role": "user", "content": "tell me"}],
                                            extra_headers={"X-Mock-Reset": "1"}):
            if ch.choices and ch.choices[0].delta.content:
                got.append(ch.choices[0].delta.content)
    [ev] = gateway.events(k["key_id"], expect=1)  # a stream that already started is never retried
    assert ev["status"] == 502 and ev["error_type"] == "upstream_connection_error"
    assert ev["output_tokens"] == len(got) == 5  # the mock drops after half of 10 tokens
    assert ev["usage_source"] == "estimated" and float(ev["cost_usd"]) > 0


def test_client_disconnect_mid_stream_is_metered_as_partial(gateway: Gateway) -> None:
    k = gateway.create_key(team="gone")
    body = (b'{"model":"gpt-4o-mini","stream":true,"max_tokens":200,'
            b'"messages":[{"role":"user","content":"long answer"}]}')
    host, port = gateway.url.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)))
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              + f"Authorization: Bearer {k['key']}\r\nX-Mock-Output-Tokens: 200\r\nX-Mock-Tokens-Per-S: 50\r\n".encode()
              + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    # Pace the upstream so the stream is still running when the client leaves.
    buf = b""
    deadline = time.monotonic() + 10
    while buf.count(b"data: ") < 3 and time.monotonic() < deadline:
        buf += s.recv(4096)
    s.close()
    [ev] = gateway.events(k["key_id"], expect=1, timeout=15)
    assert ev["status"] == 499 and ev["error_type"] == "client_disconnected"
    assert 0 < ev["output_tokens"] < 200


def test_admin_patch_changes_attribution_on_the_next_call(gateway: Gateway) -> None:
    admin = {"Authorization": f"Bearer {gateway.admin_key}"}
    k = gateway.create_key(team="old-team", models=["gpt-4o"])
    r = httpx.patch(f"{gateway.url}/admin/keys/{k['key_id']}", headers=admin,
                    json={"team": "new-team", "models": ["gpt-4o-mini"], "tags": {"cost_center": "42"}})
    assert r.status_code == 200, r.text
    view = r.json()
    assert (view["team"], view["models"], view["tags"]) == ("new-team", ["gpt-4o-mini"], {"cost_center": "42"})
    assert post(gateway, k["key"], CHAT).status_code == 200
    [ev] = gateway.events(k["key_id"], expect=1)
    assert ev["team"] == "new-team" and orjson.loads(ev["tags"]) == {"cost_center": "42"}
    bad = httpx.patch(f"{gateway.url}/admin/keys/{k['key_id']}", headers=admin, json={"hash": "x"})
    assert bad.status_code == 400 and "Unknown field" in bad.text
    assert httpx.get(f"{gateway.url}/admin/keys", headers={"Authorization": "Bearer nope"}).status_code == 401
