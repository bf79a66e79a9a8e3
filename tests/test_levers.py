"""Money saved per lever, as recorded on ledger events: routing against the group's reference,
a budget downgrade, an exact-cache hit, and the negative saving of a rejected cascade step."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import orjson

from margin.config import parse_config
from margin.domain import Usage
from margin.pricing import PriceBook
from tests.conftest import Mock, gateway_config, start_gateway, stop


def _saved(row: dict[str, Any]) -> dict[str, Decimal]:
    out: dict[str, Decimal] = {}
    for a in orjson.loads(row["actions"]):
        if a.get("action") == "saved":
            out[a["lever"]] = out.get(a["lever"], Decimal(0)) + Decimal(a["usd"])
    return out


def test_each_lever_records_what_it_saved(mock_upstream: Mock, tmp_path: Path) -> None:
    cfg = gateway_config(
        tmp_path, mock_upstream.url, f"sqlite:///{tmp_path}/l.db",
        groups=[{"name": "auto", "candidates": ["gpt-4o-mini", "gpt-4o"], "strategy": "cheapest"},
                {"name": "careful", "candidates": ["gpt-4o-mini", "gpt-4o"], "strategy": "cascade",
                 "verify_regex": "^NEVER$"}],
        cache={"enabled": True, "allow_nondeterministic": True},
        budgets=[{"id": "tight", "scope": {"team": "thrifty"}, "limit_usd": "10",
                  "thresholds": [{"at": 0.0001, "action": "downgrade", "map": {"gpt-4o": "gpt-4o-mini"}}]}])
    cfg["models"][0]["quality"], cfg["models"][1]["quality"] = 0.6, 0.9
    gw = start_gateway(tmp_path, cfg)
    prices = PriceBook(parse_config(cfg).models)
    try:
        key = gw.create_key(team="support")["key"]
        thrifty = gw.create_key(team="thrifty")["key"]

        def chat(k: str, model: str, text: str) -> httpx.Response:
            r = httpx.post(gw.base_url + "/chat/completions", timeout=30, headers={"Authorization": f"Bearer {k}"},
                           json={"model": model, "max_tokens": 12, "messages": [{"role": "user", "content": text}]})
            assert r.status_code == 200, r.text
            return r

        chat(key, "auto", "route me")          # routed to gpt-4o-mini instead of gpt-4o
        chat(key, "auto", "route me")          # the same again: an exact-cache hit
        chat(thrifty, "gpt-4o", "warm up")     # spends a little: the budget's 0.0001% threshold is crossed
        chat(thrifty, "gpt-4o", "downgrade me")
        chat(key, "careful", "cascade me")     # mini's answer fails the regex: gpt-4o answers
        rows = gw.events(expect=6)
    finally:
        assert gw.proc is not None
        stop(gw.proc)

    def usage(r: dict[str, Any]) -> Usage:
        return Usage(input_tokens=r["input_tokens"], output_tokens=r["output_tokens"],
                     cached_input_tokens=r["cached_input_tokens"])

    routed, hit = [r for r in rows if r["requested_model"] == "auto"]
    assert routed["model"] == "gpt-4o-mini" and routed["lever"] == "routing"
    want = prices.cost("gpt-4o", usage(routed)).total_usd - prices.cost("gpt-4o-mini", usage(routed)).total_usd
    assert _saved(routed) == {"routing": want} and Decimal(routed["avoided_cost_usd"]) == want > 0
    assert hit["cache_hit"] == "exact" and set(_saved(hit)) == {"cache"} and Decimal(hit["cost_usd"]) == 0
    assert Decimal(hit["avoided_cost_usd"]) == Decimal(routed["cost_usd"]) and hit["tokens_saved"] > 0

    down = next(r for r in rows if r["requested_model"] == "gpt-4o" and r["model"] == "gpt-4o-mini")
    want = prices.cost("gpt-4o", usage(down)).total_usd - Decimal(down["cost_usd"])
    assert _saved(down) == {"downgrade": want} and down["lever"] == "downgrade"

    first, second = [r for r in rows if r["requested_model"] == "careful"]
    assert first["model"] == "gpt-4o-mini" and _saved(first) == {"routing": -Decimal(first["cost_usd"])}
    assert second["model"] == "gpt-4o" and second["parent_event_id"] == first["event_id"] and not _saved(second)
