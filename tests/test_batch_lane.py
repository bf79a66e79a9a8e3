"""The batch lane through a real gateway and the `openai` SDK, on SQLite and PostgreSQL: files and
batches as OpenAI serves them, precise validation, ownership, cancellation, failures in the error
file, revocation honoured mid-batch, and single requests deferred by priority or by a budget."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from tests.conftest import Gateway, Mock, gateway_config, start_gateway, stop


@pytest.fixture(scope="module")
def lane(ledger_url: str, mock_upstream: Mock, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("lane")
    cfg = gateway_config(tmp, mock_upstream.url, ledger_url, batch_lane={
        "enabled": True, "poll_interval_s": 0.1, "defer_low_priority": "always", "max_concurrency": 4})
    thresholds = [{"at": 1, "action": "defer", "priority": "bulk"}, {"at": 100, "action": "block"}]
    cfg["budgets"] = [{"id": "frugal", "scope": {"team": "frugal"}, "limit_usd": "0.001", "period": "day",
                       "thresholds": thresholds}]
    gw = start_gateway(tmp, cfg)
    yield gw
    assert gw.proc is not None
    stop(gw.proc)


def jsonl(n: int, url: str = "/v1/chat/completions", model: str = "gpt-4o-mini", **extra: Any) -> bytes:
    body: dict[str, Any] = {"model": model, "max_tokens": 5, "temperature": 0}
    lines = []
    for i in range(n):
        b = ({**body, "input": f"text {i}"} if url == "/v1/embeddings"
             else {**body, "messages": [{"role": "user", "content": f"q{i}"}]})
        lines.append(json.dumps({"custom_id": f"c{i}", "method": "POST", "url": url, "body": {**b, **extra}}))
    return "\n".join(lines).encode()


def sdk(gw: Gateway, key: str, **headers: str) -> OpenAI:
    return OpenAI(base_url=gw.base_url, api_key=key, max_retries=0, default_headers=headers or None)


def wait_done(c: OpenAI, batch_id: str, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while (b := c.batches.retrieve(batch_id)).status not in ("completed", "cancelled", "expired", "failed"):
        assert time.monotonic() < deadline, b
        time.sleep(0.1)
    return b


def test_sdk_round_trip(lane: Gateway) -> None:
    k = lane.create_key(org="acme", team="ml")
    c = sdk(lane, k["key"])
    f = c.files.create(file=("in.jsonl", io.BytesIO(jsonl(12))), purpose="batch")
    assert (f.purpose, f.filename, f.status) == ("batch", "in.jsonl", "processed")
    assert c.files.retrieve(f.id).bytes == len(jsonl(12))
    assert f.id in [x.id for x in c.files.list(purpose="batch")]
    b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                         metadata={"job": "nightly"})
    assert b.status == "in_progress" and b.request_counts is not None and b.request_counts.total == 12
    b = wait_done(c, b.id)
    assert b.status == "completed" and b.request_counts is not None and b.request_counts.completed == 12
    assert b.metadata == {"job": "nightly"} and b.completed_at and b.output_file_id and b.error_file_id is None
    lines = [json.loads(x) for x in c.files.content(b.output_file_id).text.splitlines()]
    assert sorted(x["custom_id"] for x in lines) == sorted(f"c{i}" for i in range(12))
    first = lines[0]
    assert first["id"].startswith("batch_req_") and first["error"] is None
    assert first["response"]["status_code"] == 200 and first["response"]["request_id"] == f"{b.id}:c0"
    assert first["response"]["body"]["object"] == "chat.completion"
    assert b.id in [x.id for x in c.batches.list(limit=5)]
    rows = lane.events(k["key_id"], expect=12)
    assert len(rows) == 12 and {r["tier"] for r in rows} == {"batch"}
    assert {r["request_id"] for r in rows} == {f"{b.id}:c{i}" for i in range(12)}
    assert c.files.delete(f.id).deleted and f.id not in [x.id for x in c.files.list()]


def test_responses_api_batch(lane: Gateway) -> None:
    """/v1/responses lines run through the lane like chat ones; the ledger says endpoint response."""
    k = lane.create_key(team="ml")
    c = sdk(lane, k["key"])
    body = {"model": "gpt-4o-mini", "max_output_tokens": 5, "temperature": 0}
    data = "\n".join(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/responses",
                                 "body": {**body, "input": f"question {i}"}}) for i in range(3))
    f = c.files.create(file=("r.jsonl", io.BytesIO(data.encode())), purpose="batch")
    b = wait_done(c, c.batches.create(input_file_id=f.id, endpoint="/v1/responses", completion_window="24h").id)
    assert b.status == "completed" and b.request_counts is not None and b.request_counts.completed == 3
    assert b.output_file_id is not None
    out = [json.loads(x) for x in c.files.content(b.output_file_id).text.splitlines()]
    assert {x["response"]["body"]["object"] for x in out} == {"response"}
    rows = lane.events(k["key_id"], expect=3)
    assert {r["endpoint"] for r in rows} == {"response"} and {r["output_tokens"] for r in rows} == {5}


def test_every_bad_line_is_named(lane: Gateway) -> None:
    c = sdk(lane, lane.create_key(org="acme")["key"])
    good = json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
                       "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]}})
    bad = "\n".join([good, "{not json", good, good.replace('"a"', '"b"').replace("/v1/chat/completions", "/v1/x"),
                     json.dumps({"custom_id": "c", "method": "POST", "url": "/v1/chat/completions",
                                 "body": {"model": "gpt-4o-mini"}}),
                     json.dumps({"custom_id": "d", "method": "POST", "url": "/v1/chat/completions",
                                 "body": {"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user"}]}})])
    with pytest.raises(openai.BadRequestError) as e:
        c.files.create(file=("bad.jsonl", io.BytesIO(bad.encode())), purpose="batch")
    msg = e.value.message
    assert "5 problem(s)" in msg and "line 2: not valid JSON" in msg
    assert "line 3: custom_id 'a' repeats line 1" in msg and "line 4: 'url' '/v1/x'" in msg
    assert "line 5: body: Missing required parameter: 'messages'" in msg and "line 6: 'body.stream'" in msg
    with pytest.raises(openai.BadRequestError, match="'purpose' must be"):
        c.files.create(file=("x.jsonl", io.BytesIO(good.encode())), purpose="fine-tune")
    emb = c.files.create(file=("e.jsonl", io.BytesIO(jsonl(2, url="/v1/embeddings", model="gpt-4o-mini"))),
                         purpose="batch")
    with pytest.raises(openai.BadRequestError, match="line 1: url /v1/embeddings does not match"):
        c.batches.create(input_file_id=emb.id, endpoint="/v1/chat/completions", completion_window="24h")
    unknown = c.files.create(file=("u.jsonl", io.BytesIO(jsonl(1, model="nope"))), purpose="batch")
    with pytest.raises(openai.BadRequestError, match="line 1: unknown model 'nope'"):
        c.batches.create(input_file_id=unknown.id, endpoint="/v1/chat/completions", completion_window="24h")
    with pytest.raises(openai.BadRequestError, match="completion_window"):
        c.batches.create(input_file_id=emb.id, endpoint="/v1/embeddings", completion_window="2d")  # type: ignore[arg-type]


def test_files_and_batches_belong_to_their_key(lane: Gateway) -> None:
    a, b = lane.create_key(org="acme", team="a"), lane.create_key(org="acme", team="b")
    ca, cb, admin = sdk(lane, a["key"]), sdk(lane, b["key"]), sdk(lane, lane.admin_key)
    f = ca.files.create(file=("a.jsonl", io.BytesIO(jsonl(1))), purpose="batch")
    batch = ca.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    for call in (lambda: cb.files.retrieve(f.id), lambda: cb.files.content(f.id), lambda: cb.batches.retrieve(batch.id),
                 lambda: cb.batches.cancel(batch.id), lambda: cb.files.delete(f.id)):
        with pytest.raises(openai.NotFoundError):
            call()
    with pytest.raises(openai.NotFoundError):  # another key cannot even start a batch from it
        cb.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert f.id not in [x.id for x in cb.files.list()] and batch.id not in [x.id for x in cb.batches.list()]
    assert admin.batches.retrieve(batch.id).id == batch.id and batch.id in [x.id for x in admin.batches.list()]
    with pytest.raises(openai.BadRequestError, match="virtual key"):
        admin.files.create(file=("x.jsonl", io.BytesIO(jsonl(1))), purpose="batch")


def test_cancel_keeps_what_was_answered_and_cancels_the_rest(lane: Gateway) -> None:
    k = lane.create_key(org="acme", team="c")
    c = sdk(lane, k["key"], **{"X-Mock-Ttft-Ms": "150"})  # stored with the batch, sent with every item
    f = c.files.create(file=("slow.jsonl", io.BytesIO(jsonl(40))), purpose="batch")
    b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    time.sleep(0.5)
    assert c.batches.cancel(b.id).status == "cancelling"
    b = wait_done(c, b.id)
    with pytest.raises(openai.ConflictError, match="only a batch in progress"):
        c.batches.cancel(b.id)
    assert b.status == "cancelled" and b.cancelled_at and b.request_counts is not None
    done = b.request_counts.completed
    assert 0 < done < 40 and b.request_counts.failed == 40 - done
    errors = [json.loads(x) for x in c.files.content(b.error_file_id or "").text.splitlines()]
    assert len(errors) == 40 - done and {e["error"]["code"] for e in errors} == {"batch_cancelled"}
    assert len(c.files.content(b.output_file_id or "").text.splitlines()) == done
    rows = lane.events(k["key_id"], expect=done)
    assert len(rows) == done, "a cancelled item is never sent"


def test_failed_requests_go_to_the_error_file_and_revocation_is_honoured(lane: Gateway) -> None:
    k = lane.create_key(org="acme", team="f")
    c = sdk(lane, k["key"], **{"X-Mock-Status": "400"})
    f = c.files.create(file=("f.jsonl", io.BytesIO(jsonl(2))), purpose="batch")
    b = wait_done(c, c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                      completion_window="24h").id)
    assert b.status == "completed" and b.request_counts is not None and b.request_counts.failed == 2
    assert b.output_file_id is None
    errs = [json.loads(x) for x in c.files.content(b.error_file_id or "").text.splitlines()]
    assert {e["response"]["status_code"] for e in errs} == {400}
    assert all(e["response"]["body"]["error"]["message"] for e in errs)

    slow = sdk(lane, k["key"], **{"X-Mock-Ttft-Ms": "150"})
    f = slow.files.create(file=("r.jsonl", io.BytesIO(jsonl(30))), purpose="batch")
    b = slow.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    time.sleep(0.4)
    r = httpx.delete(f"{lane.url}/admin/keys/{k['key_id']}", headers={"Authorization": f"Bearer {lane.admin_key}"})
    assert r.status_code == 200
    admin = sdk(lane, lane.admin_key)
    b = wait_done(admin, b.id)
    assert b.request_counts is not None and b.request_counts.failed > 0
    errs = [json.loads(x) for x in admin.files.content(b.error_file_id or "").text.splitlines()]
    assert {e["response"]["body"]["error"]["code"] for e in errs} == {"revoked_api_key"}


def test_low_priority_requests_are_deferred_and_polled(lane: Gateway) -> None:
    k = lane.create_key(org="acme", team="d")
    body = {"model": "gpt-4o-mini", "max_tokens": 5, "messages": [{"role": "user", "content": "later please"}]}
    r = httpx.post(lane.base_url + "/chat/completions", json=body,
                   headers={"Authorization": f"Bearer {k['key']}", "X-Margin-Priority": "low", "X-Request-Id": "rq-1"})
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["object"] == "margin.deferred" and job["status"] == "queued" and job["reason"] == "window"
    assert r.headers["location"] == f"/v1/deferred/{job['id']}"
    deadline = time.monotonic() + 30
    while (p := httpx.get(lane.url + job["poll_url"], headers={"Authorization": f"Bearer {k['key']}"})).status_code \
            == 202:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert p.status_code == 200 and p.json()["object"] == "chat.completion" and p.json()["choices"]
    other = lane.create_key(org="acme", team="x")
    assert httpx.get(lane.url + job["poll_url"], headers={"Authorization": f"Bearer {other['key']}"}).status_code == 404
    rows = sorted(lane.events(k["key_id"], expect=2), key=lambda e: e["ts_start"])
    assert [r["status"] for r in rows] == [202, 200] and {r["request_id"] for r in rows} == {"rq-1"}
    assert json.loads(rows[0]["actions"])[0] == {"action": "defer", "reason": "window", "job_id": job["id"]}
    # Streaming requests are served now: a client that streams is waiting for the answer.
    s = httpx.post(lane.base_url + "/chat/completions", json={**body, "stream": True},
                   headers={"Authorization": f"Bearer {k['key']}", "X-Margin-Priority": "low"})
    assert s.status_code == 200 and "data: [DONE]" in s.text


def test_a_budget_defer_becomes_a_job_that_waits_for_the_next_period(lane: Gateway) -> None:
    k = lane.create_key(org="acme", team="frugal")
    h = {"Authorization": f"Bearer {k['key']}"}
    body = {"model": "gpt-4o", "max_tokens": 12, "messages": [{"role": "user", "content": "spend a little"}]}
    assert httpx.post(lane.base_url + "/chat/completions", json=body, headers=h).status_code == 200
    time.sleep(1.2)  # the threshold is decided on the counters this replica last saw
    r = httpx.post(lane.base_url + "/chat/completions", json=body, headers={**h, "X-Margin-Priority": "bulk"})
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["reason"] == "budget" and job["not_before"] > time.time() + 60  # the budget's next period
    # The ledger says what the client was told: 202, the budget's defer action and where the request went.
    deferred = sorted(lane.events(k["key_id"], expect=2), key=lambda e: e["ts_start"])[1]
    assert (deferred["status"], deferred["error_type"]) == (202, None)
    assert json.loads(deferred["actions"]) == [{"action": "defer", "budget": "frugal", "job_id": job["id"]}]
    time.sleep(0.5)
    p = httpx.get(lane.url + job["poll_url"], headers=h)
    assert p.status_code == 202 and p.json()["status"] == "queued"
    assert httpx.post(lane.url + job["poll_url"] + "/cancel", headers=h).json()["status"] == "cancelled"
    gone = httpx.get(lane.url + job["poll_url"], headers=h)
    assert gone.status_code == 410 and gone.json()["error"]["code"] == "deferred_cancelled"


def test_a_shut_window_holds_batches_and_low_priority_work(mock_upstream: Mock, tmp_path: Path) -> None:
    now = time.gmtime()
    start = (now.tm_hour + 2) % 24
    window = f"{start:02d}:00-{(start + 1) % 24:02d}:00"
    cfg = gateway_config(tmp_path, mock_upstream.url, f"sqlite:///{tmp_path}/w.db",
                         batch_lane={"enabled": True, "windows": [window], "poll_interval_s": 0.1})
    gw = start_gateway(tmp_path, cfg)
    try:
        k = gw.create_key(org="acme")
        c = sdk(gw, k["key"])
        f = c.files.create(file=("w.jsonl", io.BytesIO(jsonl(3))), purpose="batch")
        b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        r = httpx.post(gw.base_url + "/chat/completions", headers={"Authorization": f"Bearer {k['key']}",
                                                                   "X-Margin-Priority": "low"},
                       json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 202 and r.json()["not_before"] % 3600 == 0
        assert r.json()["not_before"] > time.time() + 3600
        normal = c.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "now"}])
        assert normal.choices, "normal priority is served at once"
        time.sleep(1.0)
        held = c.batches.retrieve(b.id)
        assert held.status == "in_progress" and held.model_extra and held.model_extra["margin"]["queued"] == 3
    finally:
        assert gw.proc is not None
        stop(gw.proc)


def test_without_the_lane_the_endpoints_say_how_to_turn_it_on(mock_upstream: Mock, tmp_path: Path) -> None:
    gw = start_gateway(tmp_path, gateway_config(tmp_path, mock_upstream.url, f"sqlite:///{tmp_path}/n.db"))
    try:
        k = gw.create_key(org="acme")
        r = httpx.get(gw.base_url + "/batches", headers={"Authorization": f"Bearer {k['key']}"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "batch_lane_disabled"
        low = httpx.post(gw.base_url + "/chat/completions", headers={"Authorization": f"Bearer {k['key']}",
                                                                     "X-Margin-Priority": "low"},
                         json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]})
        assert low.status_code == 200, "no lane: low priority is served as usual"
    finally:
        assert gw.proc is not None
        stop(gw.proc)
