"""Regressions for defects found in review: each test reproduces the reported trigger."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from aiohttp import web

from margin.config import ProviderConfig
from margin.ledger import LedgerWriter, Spool, event_to_row
from margin.ledger.sqlite import SQLiteStore
from margin.ledger.store import StoreUnavailable
from margin.providers.openai_http import OpenAIHTTPProvider
from margin.providers.usage import parse_usage
from tests.conftest import free_port, gateway_config, start_gateway, stop
from tests.test_ledger_writer import event

# --- usage parsing -------------------------------------------------------------------------------

def test_usage_aliases_anthropic_style_and_reasoning_outside_completion() -> None:
    u = parse_usage({"usage": {"input_tokens": 10, "output_tokens": 4}})
    assert u is not None and (u.input_tokens, u.output_tokens) == (10, 4)
    # Anthropic-style: prompt excludes cache reads/writes.
    u = parse_usage({"usage": {"prompt_tokens": 100, "completion_tokens": 5, "cache_read_input_tokens": 800,
                               "cache_creation_input_tokens": 50}})
    assert u is not None and (u.input_tokens, u.cached_input_tokens, u.cache_write_tokens) == (950, 800, 50)
    # Reasoning reported outside completion_tokens (total says so): billed as output.
    u = parse_usage({"usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 215,
                               "completion_tokens_details": {"reasoning_tokens": 200}}})
    assert u is not None and u.output_tokens == 205
    # OpenAI: reasoning already inside completion_tokens: not added twice.
    u = parse_usage({"usage": {"prompt_tokens": 10, "completion_tokens": 205, "total_tokens": 215,
                               "completion_tokens_details": {"reasoning_tokens": 200}}})
    assert u is not None and u.output_tokens == 205


def test_garbage_token_counts_are_clamped() -> None:
    u = parse_usage({"usage": {"prompt_tokens": 1e19, "completion_tokens": True, "total_tokens": float("nan")}})
    assert u is not None and u.input_tokens == 2**31 and u.output_tokens == 0


# --- a scripted upstream for SSE edge cases ------------------------------------------------------

SCRIPTS: dict[str, bytes] = {
    # data split over two lines, a bare keep-alive, CRLF endings, an `event:` line
    "multiline": (b': hello\r\n\r\nevent: message\r\ndata: {"choices":[{"index":0,\r\n'
                  b'data: "delta":{"content":"hi "}}]}\r\n\r\ndata:\r\n\r\n'
                  b'data: {"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":1}}\r\n\r\n'
                  b"data: [DONE]\r\n\r\n"),
    # DeepSeek-style: usage on the last content chunk
    "usage_on_content": (b'data: {"choices":[{"index":0,"delta":{"content":"a "}}]}\n\n'
                         b'data: {"choices":[{"index":0,"delta":{"content":"b "},"finish_reason":"stop"}],'
                         b'"usage":{"prompt_tokens":1000,"completion_tokens":300,'
                         b'"prompt_tokens_details":{"cached_tokens":800}}}\n\ndata: [DONE]\n\n'),
    # vLLM-style error inside a 200 stream
    "error_event": (b'data: {"choices":[{"index":0,"delta":{"content":"a "}}]}\n\n'
                    b'event: error\ndata: {"error":{"message":"engine died","type":"server_error"}}\n\n'
                    b"data: [DONE]\n\n"),
    # usage arrives, then the connection closes without [DONE]
    "usage_then_eof": (b'data: {"choices":[{"index":0,"delta":{"content":"a "}}]}\n\n'
                       b'data: {"choices":[],"usage":{"prompt_tokens":1000,"completion_tokens":300}}\n\n'),
}


async def scripted(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    script = SCRIPTS[body["messages"][0]["content"]]
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    await resp.write(script)
    return resp


@pytest.fixture
async def upstream() -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", scripted)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"http://127.0.0.1:{port}/v1"
    await runner.cleanup()


async def collect(url: str, name: str) -> list[Any]:
    p = OpenAIHTTPProvider(ProviderConfig(name="x", kind="openai", base_url=url))
    await p.start()
    try:
        return [c.data async for c in p.stream("chat", {"model": "m", "messages": [{"role": "user", "content": name}]})]
    finally:
        await p.close()


async def test_sse_multiline_data_keepalives_and_crlf(upstream: str) -> None:
    got = await collect(upstream, "multiline")
    assert got[0] == {"choices": [{"index": 0, "delta": {"content": "hi "}}]}
    assert got[1]["usage"]["prompt_tokens"] == 7 and got[-1] is None and len(got) == 3


async def test_gateway_bills_provider_usage_in_edge_cases(upstream: str, tmp_path: Path) -> None:
    cfg = gateway_config(tmp_path, upstream, f"sqlite:///{tmp_path}/l.db")
    gw = await asyncio.to_thread(start_gateway, tmp_path, cfg)
    try:
        k = await asyncio.to_thread(gw.create_key, team="edge")
        async with httpx.AsyncClient(timeout=10) as c:
            for name in ("usage_on_content", "error_event", "usage_then_eof"):
                r = await c.post(gw.base_url + "/chat/completions", headers={"Authorization": f"Bearer {k['key']}"},
                                 json={"model": "gpt-4o-mini", "stream": True,
                                       "messages": [{"role": "user", "content": name}]})
                assert r.status_code == 200
                if name == "usage_on_content":  # the client did not ask for usage: stripped, content kept
                    chunks = [orjson.loads(x[6:]) for x in r.text.split("\n\n") if x.startswith("data: {")]
                    assert all("usage" not in ch for ch in chunks) and len(chunks) == 2
        rows = {r["workflow"] or i: r for i, r in enumerate(await asyncio.to_thread(gw.events, k["key_id"], 3))}
        by_out = sorted(rows.values(), key=lambda r: r["ts_start"])
        ok, err, eof = by_out
        assert (ok["input_tokens"], ok["cached_input_tokens"], ok["output_tokens"], ok["usage_source"]) == (
            1000, 800, 300, "provider")
        assert ok["status"] == 200
        assert err["status"] == 502 and err["error_type"] == "upstream_error"
        assert eof["status"] == 502 and (eof["input_tokens"], eof["output_tokens"]) == (1000, 300)
        assert eof["usage_source"] == "provider"
    finally:
        assert gw.proc is not None
        stop(gw.proc)


# --- the writer survives what used to kill or wedge it ---------------------------------------------

async def test_writer_survives_a_failing_disk_and_a_down_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = SQLiteStore(f"sqlite:///{tmp_path}/l.db")
    await store.open()
    w = LedgerWriter(store, Spool(tmp_path / "spool"), flush_interval_s=0.005, retry_interval_s=0.1)
    await w.start()
    calls = {"store": 0, "disk": 0}
    real_write, real_append = store.write_events, w.spool.append

    async def flaky_store(rows: list[dict[str, Any]]) -> None:
        calls["store"] += 1
        if calls["store"] <= 3:
            raise StoreUnavailable("down")
        await real_write(rows)

    def full_disk(rows: list[dict[str, Any]]) -> None:
        calls["disk"] += 1
        if calls["disk"] <= 2:
            raise OSError(28, "No space left on device")
        real_append(rows)

    monkeypatch.setattr(store, "write_events", flaky_store)
    monkeypatch.setattr(w.spool, "append", full_disk)
    for i in range(30):
        w.append(event(i))
    await asyncio.sleep(1.0)
    for i in range(30, 40):
        w.append(event(i))
    await asyncio.sleep(0.5)
    await w.close()
    assert await store.count_events() == 40


async def test_read_only_store_is_an_outage_not_bad_rows(tmp_path: Path) -> None:
    import sqlite3

    store = SQLiteStore(f"sqlite:///{tmp_path}/l.db")
    await store.open()
    assert not store.is_data_error(sqlite3.OperationalError("attempt to write a readonly database"))
    assert not store.is_data_error(StoreUnavailable("x"))
    assert store.is_data_error(OverflowError("int too large"))


async def test_a_row_sqlite_cannot_bind_does_not_wedge_the_ledger(tmp_path: Path) -> None:
    store = SQLiteStore(f"sqlite:///{tmp_path}/l.db")
    await store.open()
    bad = event_to_row(event(0))
    bad["input_tokens"] = 10**20  # overflows SQLite's INTEGER
    with pytest.raises(OverflowError):
        await store.write_events([bad])
    await store.write_events([event_to_row(event(1))])  # the transaction was rolled back
    assert await store.count_events() == 1


async def test_overflowed_rows_are_replayed_while_the_store_is_up(tmp_path: Path) -> None:
    store = SQLiteStore(f"sqlite:///{tmp_path}/l.db")
    await store.open()
    w = LedgerWriter(store, Spool(tmp_path / "spool"), flush_interval_s=0.005, retry_interval_s=0.1, queue_size=5)
    await w.start()
    for i in range(50):
        w.append(event(i))
    assert w.stats.overflowed == 45
    await asyncio.sleep(0.5)
    w.append(event(99))  # ordinary traffic afterwards
    await asyncio.sleep(0.5)
    assert await store.count_events() == 51  # without a restart
    await w.close()
