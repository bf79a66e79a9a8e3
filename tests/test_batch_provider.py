"""Batch items for a provider with its own batch API go there as one provider batch: priced at the
provider's batch price with the saving recorded, budgets reserved before submission and settled
after, and a gateway killed while the provider batch is in flight neither loses nor resubmits it."""

from __future__ import annotations

import io
import json
import os
import signal
import sqlite3
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI

from margin.config import ModelConfig
from margin.domain import Usage
from margin.pricing.batch import batch_rates
from margin.pricing.prices import model_rates
from tests.conftest import Gateway, Mock, free_port, gateway_config, read_events, start_gateway, stop

MINI = {"genai_prices": "openai/gpt-4o-mini"}


def provider_cfg(tmp: Path, mock: Mock, url: str, **lane: Any) -> dict[str, Any]:
    cfg = gateway_config(tmp, mock.url, url, batch_lane={"enabled": True, "poll_interval_s": 0.1,
                                                         "provider_poll_s": 0.2, **lane})
    cfg["providers"].append({"name": "bulk", "kind": "openai", "base_url": mock.url, "batch_api": True,
                             "batch_discount": "0.4"})
    cfg["models"] += [{"name": "mini-b", "provider": "bulk", "upstream_model": "gpt-4o-mini", "price": MINI},
                      {"name": "house-b", "provider": "bulk", "upstream_model": "mock-model",
                       "price": {"per_million": {"input": "1", "output": "3"}}}]
    cfg["budgets"] = [{"id": "team-b", "scope": {"team": "b"}, "limit_usd": 5, "period": "day"},
                      {"id": "poor", "scope": {"team": "poor"}, "limit_usd": "0.0000001", "period": "day"}]
    return cfg


@pytest.fixture(scope="module")
def gw(ledger_url: str, mock_upstream: Mock, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("bulk")
    g = start_gateway(tmp, provider_cfg(tmp, mock_upstream, ledger_url))
    yield g
    assert g.proc is not None
    stop(g.proc)


def jsonl(model: str, n: int) -> bytes:
    return "\n".join(json.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions",
                                 "body": {"model": model, "max_tokens": 6, "temperature": 0,
                                          "messages": [{"role": "user", "content": f"bulk {i}"}]}})
                     for i in range(n)).encode()


def mock_batches(mock: Mock) -> dict[str, int]:
    data: dict[str, int] = httpx.get(mock.url.removesuffix("/v1") + "/mock/batches").json()
    return data


def run(c: OpenAI, model: str, n: int, timeout: float = 60) -> Any:
    f = c.files.create(file=("b.jsonl", io.BytesIO(jsonl(model, n))), purpose="batch")
    b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    deadline = time.monotonic() + timeout
    while (b := c.batches.retrieve(b.id)).status != "completed":
        assert time.monotonic() < deadline, b
        time.sleep(0.1)
    return b


def counter(gw: Gateway, budget: str) -> dict[str, Any]:
    r = httpx.get(f"{gw.url}/admin/budgets/{budget}", headers={"Authorization": f"Bearer {gw.admin_key}"})
    data: dict[str, Any] = r.json()["counters"][0]
    return data


def test_forwarded_items_are_priced_at_the_batch_price_and_settle_their_budget(gw: Gateway,
                                                                               mock_upstream: Mock) -> None:
    k = gw.create_key(org="acme", team="b")
    c = OpenAI(base_url=gw.base_url, api_key=k["key"], max_retries=0)
    before = mock_batches(mock_upstream)
    b = run(c, "mini-b", 20)
    assert b.request_counts.completed == 20 and b.output_file_id
    after = mock_batches(mock_upstream)
    assert after["batches"] == before["batches"] + 1 and after["requests"] == before["requests"] + 20
    rows = gw.events(k["key_id"], expect=20)
    assert len(rows) == 20
    batch, live = batch_rates(ModelConfig(name="mini-b", provider="bulk", price=MINI)), model_rates(
        ModelConfig(name="mini-b", provider="bulk", price=MINI))
    for r in rows:
        u = Usage(input_tokens=r["input_tokens"], output_tokens=r["output_tokens"],
                  cached_input_tokens=r["cached_input_tokens"])
        assert Decimal(r["cost_usd"]) == batch.cost(u).total_usd > 0
        saved = live.cost(u).total_usd - batch.cost(u).total_usd
        assert Decimal(r["avoided_cost_usd"]) == saved > 0 and r["lever"] == "batch" and r["tier"] == "batch"
        assert json.loads(r["actions"]) == [{"action": "saved", "lever": "batch", "usd": format(saved, "f"),
                                             "tokens": 0}]
        assert r["provider"] == "bulk" and r["route_reason"].startswith("provider batch API")
    spent = sum(Decimal(r["cost_usd"]) for r in rows)
    state = counter(gw, "team-b")
    assert Decimal(state["spent"]) >= spent and Decimal(state["reserved"]) == 0  # nano-USD counters round up
    assert Decimal(state["spent"]) - spent < Decimal("0.00000003")


def test_a_configured_discount_prices_models_without_a_published_batch_price(gw: Gateway) -> None:
    k = gw.create_key(org="acme", team="b")
    b = run(OpenAI(base_url=gw.base_url, api_key=k["key"], max_retries=0), "house-b", 3)
    assert b.request_counts.completed == 3
    for r in gw.events(k["key_id"], expect=3):
        full = Decimal(r["input_tokens"]) * 1 / 10**6 + Decimal(r["output_tokens"]) * 3 / 10**6
        assert Decimal(r["cost_usd"]) == full * Decimal("0.6") and Decimal(r["avoided_cost_usd"]) == full * Decimal(
            "0.4")


def test_items_a_budget_refuses_are_not_submitted(gw: Gateway, mock_upstream: Mock) -> None:
    k = gw.create_key(org="acme", team="poor")
    c = OpenAI(base_url=gw.base_url, api_key=k["key"], max_retries=0)
    before = mock_batches(mock_upstream)
    f = c.files.create(file=("p.jsonl", io.BytesIO(jsonl("mini-b", 3))), purpose="batch")
    b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    time.sleep(1.5)
    b = c.batches.retrieve(b.id)
    assert b.status == "in_progress" and b.model_extra and b.model_extra["margin"]["queued"] == 3
    assert mock_batches(mock_upstream) == before, "nothing the budget cannot cover reaches the provider"
    refused = gw.events(k["key_id"], expect=3)
    assert refused and {r["error_type"] for r in refused} == {"budget_exceeded"}
    assert c.batches.cancel(b.id).status in ("cancelling", "cancelled")


@pytest.mark.parametrize("before_recording", [False, True])
def test_a_kill_while_the_provider_batch_is_in_flight_loses_and_repeats_nothing(
        mock_upstream: Mock, tmp_path: Path, before_recording: bool) -> None:
    """before_recording: the replica died after the provider accepted the batch but before it
    wrote down the provider's batch id (simulated by erasing it): the next one finds it by metadata."""
    url = f"sqlite:///{tmp_path}/k.db"
    cfg = provider_cfg(tmp_path, mock_upstream, url, provider_poll_s=1.5, lease_s=1)
    port = free_port()
    g = start_gateway(tmp_path, cfg, port)
    assert g.proc is not None
    k = g.create_key(org="acme", team="b")
    c = OpenAI(base_url=g.base_url, api_key=k["key"], max_retries=0)
    before = mock_batches(mock_upstream)
    f = c.files.create(file=("k.jsonl", io.BytesIO(jsonl("mini-b", 50))), purpose="batch")
    b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    deadline = time.monotonic() + 20
    while not (m := c.batches.retrieve(b.id).model_extra) or not m["margin"]["at_provider"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(g.proc.pid, signal.SIGKILL)  # submitted, not yet polled
    g.proc.wait(10)
    if before_recording:
        with sqlite3.connect(url.removeprefix("sqlite:///")) as db:
            db.execute("UPDATE batch_upstreams SET status = 'preparing', provider_batch_id = NULL, next_poll = 0")
    g = start_gateway(tmp_path, cfg, port)
    try:
        deadline = time.monotonic() + 60
        while (b := c.batches.retrieve(b.id)).status != "completed":
            assert time.monotonic() < deadline, b
            time.sleep(0.1)
        assert b.request_counts.completed == 50
        after = mock_batches(mock_upstream)
        assert after["batches"] == before["batches"] + 1 and after["requests"] == before["requests"] + 50
        mine = [r for r in read_events(url) if (r["request_id"] or "").startswith(b.id)]
        assert len(mine) == 50 == len({r["request_id"] for r in mine})
        lines = c.files.content(b.output_file_id or "").text.splitlines()
        assert len(lines) == 50 == len({json.loads(x)["custom_id"] for x in lines})
    finally:
        assert g.proc is not None
        stop(g.proc)
