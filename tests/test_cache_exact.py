"""The exact cache: hits metered with the cost they avoided, streams replayed, opt-out by header,
and never a hit across tenants."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from margin.domain import Attribution
from margin.policy import cache as cp
from tests.conftest import Gateway, Mock, gateway_config, start_gateway, stop


@pytest.fixture
def cached(mock_upstream: Mock, tmp_path: Path) -> Any:
    cfg = gateway_config(tmp_path, mock_upstream.url, f"sqlite:///{tmp_path}/l.db",
                         cache={"enabled": True, "ttl_s": 60, "scope": "org"})
    gw = start_gateway(tmp_path, cfg)
    yield gw
    assert gw.proc is not None
    stop(gw.proc)


def ask(gw: Gateway, key: str, stream: bool = False, temperature: float | None = 0, **headers: str) -> httpx.Response:
    body: dict[str, Any] = {"model": "gpt-4o", "max_tokens": 6, "stream": stream,
                            "messages": [{"role": "user", "content": "what is margin"}]}
    if temperature is not None:
        body["temperature"] = temperature
    return httpx.post(gw.base_url + "/chat/completions", json=body, timeout=30,
                      headers={"Authorization": f"Bearer {key}", **headers})


def test_hit_is_metered_with_zero_cost_and_the_cost_it_avoided(cached: Gateway) -> None:
    k = cached.create_key(org="acme", team="a")
    miss = ask(cached, k["key"])
    hit = ask(cached, k["key"])
    assert miss.status_code == hit.status_code == 200
    assert hit.headers["x-margin-cache"] == "hit" and "x-margin-cache" not in miss.headers
    assert hit.json()["choices"] == miss.json()["choices"]
    rows = sorted(cached.events(k["key_id"], expect=2), key=lambda r: r["ts_start"])
    assert rows[0]["cache_hit"] is None and Decimal(rows[0]["cost_usd"]) > 0
    assert rows[1]["cache_hit"] == "exact" and rows[1]["lever"] == "cache"
    assert Decimal(rows[1]["cost_usd"]) == 0
    assert Decimal(rows[1]["avoided_cost_usd"]) == Decimal(rows[0]["cost_usd"])
    assert rows[1]["tokens_saved"] == rows[0]["input_tokens"] + rows[0]["output_tokens"]
    # Same org, another team: shares the org's entries (scope: org).
    other = cached.create_key(org="acme", team="b")
    assert ask(cached, other["key"]).headers.get("x-margin-cache") == "hit"
    # Another org never does.
    stranger = cached.create_key(org="globex", team="a")
    assert "x-margin-cache" not in ask(cached, stranger["key"]).headers


def test_streams_are_replayed_with_identical_content(cached: Gateway) -> None:
    k = cached.create_key(org="s")["key"]

    def content(r: httpx.Response) -> str:
        events = [orjson.loads(x[6:]) for x in r.text.split("\n\n") if x.startswith("data: {")]
        return "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e.get("choices"))

    first, second = ask(cached, k, stream=True), ask(cached, k, stream=True)
    assert second.headers.get("x-margin-cache") == "hit"
    assert content(first) == content(second) and content(first)
    assert second.text.rstrip().endswith("data: [DONE]")


def test_opt_out_by_header_and_nondeterministic_requests(cached: Gateway) -> None:
    k = cached.create_key(org="o")["key"]
    ask(cached, k)
    assert "x-margin-cache" not in ask(cached, k, **{"Cache-Control": "no-cache"}).headers
    assert "x-margin-cache" not in ask(cached, k, **{"Cache-Control": "no-store"}).headers
    # temperature > 0 (or absent: OpenAI's default is 1) is not cached unless allowed
    ask(cached, k, temperature=0.7)
    assert "x-margin-cache" not in ask(cached, k, temperature=0.7).headers
    ask(cached, k, temperature=None)
    assert "x-margin-cache" not in ask(cached, k, temperature=None).headers


@settings(max_examples=300, deadline=None)
@given(orgs=st.tuples(st.text("ab/", max_size=4), st.text("ab/", max_size=4)),
       teams=st.tuples(st.text("ab/", max_size=4), st.text("ab/", max_size=4)),
       keys=st.tuples(st.text(max_size=5), st.text(max_size=5)), prompt=st.text(max_size=40),
       scope=st.sampled_from(["org", "team", "key"]))
def test_no_cross_tenant_key_collision(orgs: tuple[str, str], teams: tuple[str, str], keys: tuple[str, str],
                                       prompt: str, scope: str) -> None:
    a = Attribution(org=orgs[0], team=teams[0], key_id=keys[0])
    b = Attribution(org=orgs[1], team=teams[1], key_id=keys[1])
    payload = {"model": "m", "temperature": 0, "messages": [{"role": "user", "content": prompt}]}
    ka = cp.cache_key("chat", "m", payload, cp.tenant(a, scope))
    kb = cp.cache_key("chat", "m", payload, cp.tenant(b, scope))
    # Tenant identity, not its spelling: names with separators must not collide.
    same_tenant = {"org": a.org == b.org, "team": (a.org, a.team) == (b.org, b.team),
                   "key": a.key_id == b.key_id}[scope]
    assert (ka == kb) == same_tenant
