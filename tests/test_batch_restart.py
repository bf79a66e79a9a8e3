"""Issue 5's "done means": a batch of 1,000 requests survives a gateway SIGKILL and a restart, and
every request is answered exactly once - one ledger event and one output line per request."""

from __future__ import annotations

import io
import json
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI

from tests.conftest import (
    BACKENDS,
    Mock,
    free_port,
    fresh_ledger,
    gateway_config,
    read_events,
    start_gateway,
    start_mock,
    stop,
)

N = 1000


@pytest.fixture(scope="module")
def slow_mock() -> Iterator[Mock]:
    m = start_mock(free_port(), output_tokens=4, seed=3, ttft_ms=25)  # slow enough to kill mid-batch
    yield m
    stop(m.proc)


@pytest.fixture(params=BACKENDS)
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    yield from fresh_ledger(request.param, tmp_path, "ledger.db")


def _lane_cfg(tmp: Path, mock: Mock, url: str) -> dict[str, Any]:
    # A short lease so the restarted gateway takes over the killed one's items quickly.
    return gateway_config(tmp, mock.url, url, batch_lane={"enabled": True, "max_concurrency": 8, "lease_s": 2,
                                                          "poll_interval_s": 0.1})


def _jsonl(n: int) -> bytes:
    return "\n".join(json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
                                 "body": {"model": "gpt-4o-mini", "max_tokens": 4, "temperature": 0,
                                          "messages": [{"role": "user", "content": f"question {i}"}]}})
                     for i in range(n)).encode()


def test_a_thousand_requests_survive_a_kill_and_restart_exactly_once(slow_mock: Mock, url: str,
                                                                       tmp_path: Path) -> None:
    _survives(signal.SIGKILL, slow_mock, url, tmp_path)


def test_a_graceful_stop_mid_batch_hands_back_its_items(slow_mock: Mock, tmp_path: Path) -> None:
    _survives(signal.SIGTERM, slow_mock, f"sqlite:///{tmp_path}/ledger.db", tmp_path)


def _survives(sig: signal.Signals, slow_mock: Mock, url: str, tmp_path: Path) -> None:
    cfg = _lane_cfg(tmp_path, slow_mock, url)
    stats = slow_mock.url.removesuffix("/v1") + "/mock/stats"
    calls_before = httpx.get(stats).json()["requests"]
    port = free_port()
    gw = start_gateway(tmp_path, cfg, port)
    assert gw.proc is not None
    key = gw.create_key(org="acme", team="batch")
    client = OpenAI(base_url=gw.base_url, api_key=key["key"], max_retries=0)
    f = client.files.create(file=("big.jsonl", io.BytesIO(_jsonl(N))), purpose="batch")
    batch = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    # Kill it hard once a good part (but not all) is answered.
    deadline = time.monotonic() + 120
    while client.batches.retrieve(batch.id).request_counts.completed < N // 5:  # type: ignore[union-attr]
        assert time.monotonic() < deadline, "the batch made no progress"
        time.sleep(0.05)
    os.kill(gw.proc.pid, sig)
    gw.proc.wait(40)

    gw = start_gateway(tmp_path, cfg, port)  # same config, same ledger: a restart
    try:
        before = client.batches.retrieve(batch.id)
        assert before.request_counts is not None and before.request_counts.completed < N, "killed too late"
        deadline = time.monotonic() + 240
        while (b := client.batches.retrieve(batch.id)).status != "completed":
            assert b.status == "in_progress" and time.monotonic() < deadline, b
            time.sleep(0.2)
        assert b.request_counts is not None
        assert (b.request_counts.total, b.request_counts.completed, b.request_counts.failed) == (N, N, 0)
        assert b.error_file_id is None and b.output_file_id

        # The output file: one line per request, each answered once, with a 200.
        lines = [json.loads(x) for x in client.files.content(b.output_file_id).text.splitlines()]
        ids = Counter(x["custom_id"] for x in lines)
        assert len(lines) == N and set(ids) == {f"req-{i}" for i in range(N)} and max(ids.values()) == 1
        assert all(x["response"]["status_code"] == 200 and x["error"] is None for x in lines)
        assert all(x["response"]["body"]["choices"][0]["message"]["content"] for x in lines)

        # The ledger: exactly one event per request, every one a 200 priced call on the batch tier.
        deadline = time.monotonic() + 30
        while len(mine := [r for r in read_events(url) if (r["request_id"] or "").startswith(batch.id)]) < N:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        per_request = Counter(r["request_id"] for r in mine)
        assert len(mine) == N and len(per_request) == N and max(per_request.values()) == 1
        assert all(r["status"] == 200 and r["tier"] == "batch" and r["key_id"] == key["key_id"] for r in mine)
        # Items in flight (or not yet committed) at the kill were sent again - the provider may bill
        # those twice - but nothing else was.
        resent = httpx.get(stats).json()["requests"] - calls_before - N
        print(f"requests sent again after the kill: {resent}")
        assert 0 <= resent <= 100
    finally:
        assert gw.proc is not None
        stop(gw.proc)
