"""Policy replay on hand-made traces: every cost below is worked out by hand from the per-million
prices in tests/data/traces/tiny_policy.yaml (small: $1 in, $2 out, $0.25 cached; big: $10, $30, $2.5)."""

from __future__ import annotations

import copy
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml

from margin.config import ConfigError, ModelConfig, parse_config
from margin.pricing import PriceBook, PricingError
from margin.pricing.batch import batch_rates
from margin.replay.engine import replay
from margin.replay.policy import policy_from_dict
from margin.replay.summary import diff, summarise
from margin.replay.traces import read_trace

HERE = Path(__file__).parent / "data" / "traces"
BASE: dict[str, Any] = yaml.safe_load((HERE / "tiny_policy.yaml").read_text())


def run(trace: str, **changes: Any) -> dict[str, Any]:
    data = copy.deepcopy(BASE)
    for k, v in changes.items():
        if k == "replay":
            data["replay"].update(v)
        else:
            data[k] = v
    return summarise(replay(read_trace(HERE / trace), policy_from_dict(data, "tiny")), "team")


def D(x: str) -> Decimal:
    return Decimal(x)


def test_rules_routing_costs_by_hand() -> None:
    r = run("tiny.jsonl")
    # small(1000, 100) = 0.0012 twice; big(5000, 200) = 0.056; big(3000, 50) = 0.0315
    assert D(r["cost_usd"]) == D("0.0899")
    # reference: everything on big = 0.013 + 0.056 + 0.013 + 0.0315
    assert D(r["reference_cost_usd"]) == D("0.1135")
    assert D(r["levers"]["routing"]) == D("0.0236")
    assert {m["model"]: D(m["cost_usd"]) for m in r["by_model"]} == {"small": D("0.0024"), "big": D("0.0875")}
    assert {x["team"]: D(x["cost_usd"]) for x in r["by"]["rows"]} == {"a": D("0.0887"), "b": D("0.0012")}
    assert [x["requests"] for x in r["routes"]] == [2, 2]


def test_exact_cache_on_the_prompt_hash_needs_deterministic_requests() -> None:
    assert run("tiny.jsonl", cache={"enabled": True})["cache_hits"] == 0  # temperature unknown: OpenAI's 1
    r = run("tiny.jsonl", cache={"enabled": True}, replay={"temperature": 0})
    assert r["cache_hits"] == 1 and D(r["cost_usd"]) == D("0.0887")
    assert D(r["levers"]["exact_cache"]) == D("0.0012")
    # per-team tenants cannot share: the repeat comes from team b
    assert run("tiny.jsonl", cache={"enabled": True, "scope": "team"}, replay={"temperature": 0})["cache_hits"] == 0


def test_prefix_cache_from_hash_ids_by_hand() -> None:
    r = run("tiny_mooncake.jsonl", replay={"model": "small"})
    # 2nd request reuses blocks 1-3 (1536 tokens at $0.25); the 3rd comes after the 300 s TTL; the 4th is
    # under 1024 tokens: 2068 + (512 + 384 + 20) + 2068 + 620 micro-dollars
    assert r["tokens"]["cached_input"] == 1536
    assert D(r["cost_usd"]) == D("0.005672")
    assert D(r["levers"]["prefix_cache"]) == D("0.001152")
    longer = run("tiny_mooncake.jsonl", replay={"model": "small", "prefix_cache": {"ttl_s": 3600}})
    assert longer["tokens"]["cached_input"] == 1536 + 2048  # the 3rd finds all four of its blocks


def test_batch_lane_for_tier_batch(tmp_path: Path) -> None:
    lines = (HERE / "tiny.jsonl").read_text().splitlines()
    lines[-1] = lines[-1].replace('"team": "a"', '"team": "a", "tier": "batch"')
    (tmp_path / "t.jsonl").write_text("\n".join(lines) + "\n")
    data = copy.deepcopy(BASE)
    r = summarise(replay(read_trace(tmp_path / "t.jsonl"), policy_from_dict(data, "tiny")))
    # tier batch routes to the cheapest fitting (small: 3000 + 100 = 0.0031) at half price
    assert r["batch_lane"] == 1
    assert D(r["cost_usd"]) == D("0.0012") + D("0.056") + D("0.0012") + D("0.00155")
    assert D(r["levers"]["batch"]) == D("0.00155")


def test_budget_blocks_what_does_not_fit() -> None:
    budget = {"id": "team-a", "scope": {"team": "a"}, "limit_usd": "0.06", "period": "day"}
    r = run("tiny.jsonl", budgets=[budget], replay={"max_tokens": 1000})
    # team a: small(1000,100) spends 0.0012; big's worst cases (5000 in + 1000 out = 0.08; 3000 + 1000 = 0.06)
    # no longer fit the 0.0588 left, so both are blocked; team b's request is not in scope.
    assert (r["served"], r["blocked"]) == (2, 2)
    assert D(r["cost_usd"]) == D("0.0024")
    assert D(r["levers"]["budget_block"]) == D("0.0875")
    b = r["budgets"][0]
    assert (b["blocks"], b["max_spent"]) == (2, "0.001200000")
    assert b["first"]["blocks"] == "2026-03-02T10:00:10+00:00"


def test_budget_downgrade_by_hand() -> None:
    budget = {"id": "team-a", "scope": {"team": "a"}, "limit_usd": "0.06", "period": "day",
              "thresholds": [{"at": 1, "action": "downgrade", "map": {"big": "small"}}, {"at": 100, "action": "block"}]}
    r = run("tiny.jsonl", budgets=[budget], replay={"max_tokens": 1000})
    # after 0.0012 (2%) team a's big requests are served by small: 0.0054 and 0.0031
    assert r["downgraded"] == 2 and D(r["cost_usd"]) == D("0.0109")
    assert D(r["levers"]["budget_downgrade"]) == D("0.079")
    levers = sum((D(v) for v in r["levers"].values() if v is not None), Decimal(0))
    assert levers == D(r["reference_cost_usd"]) - D(r["cost_usd"])


def test_budget_caps_output_when_the_client_sets_none() -> None:
    budget = {"id": "tight", "scope": {"team": "a"}, "limit_usd": "0.0015", "period": "day"}
    r = run("tiny.jsonl", budgets=[budget], replay={"model": "small"})
    # first call: 1000 in leaves 0.0005 for output: margin caps max_tokens at 250 >= 100 (not truncated); it
    # spends 0.0012; the next (5000 in = 0.005) cannot fit even with 1 output token: blocked.
    assert r["truncated"] == 0 and r["blocked"] == 2 and D(r["cost_usd"]) == D("0.0024")


def test_diff_against_a_baseline_and_a_forced_migration() -> None:
    cur = run("tiny.jsonl")
    base = run("tiny.jsonl", replay={"model": "big"})
    d = diff(cur, base)
    assert D(d["delta_usd"]) == D("0.0899") - D("0.1135")
    pol = policy_from_dict(copy.deepcopy(BASE), "tiny")
    moved = summarise(replay(read_trace(HERE / "tiny.jsonl"), pol, force_model="small", force_from="big"))
    assert D(moved["cost_usd"]) == D("0.0012") * 2 + D("0.0054") + D("0.0031")


def test_policy_errors_are_precise() -> None:
    with pytest.raises(ConfigError, match=r"replay\.model names 'nope'"):
        policy_from_dict({**copy.deepcopy(BASE), "replay": {"model": "nope"}}, "x")
    with pytest.raises(ConfigError, match=r"replay\.bogus: Extra inputs"):
        policy_from_dict({**copy.deepcopy(BASE), "replay": {"bogus": 1}}, "x")
    data = copy.deepcopy(BASE)
    data["replay"] = {}
    with pytest.raises(ValueError, match=r"records no model: set `replay\.model`"):
        replay(read_trace(HERE / "tiny.jsonl"), policy_from_dict(data, "x"))


def test_batch_prices() -> None:
    gpt4o = ModelConfig(name="g", provider="p", price={"genai_prices": "openai/gpt-4o"})
    r = batch_rates(gpt4o)
    assert (r.input.base, r.output.base) == (D("1.25"), D("5"))  # genai-prices' batch variant: half of 2.5/10
    assert "batch" in r.source
    own = ModelConfig(name="h", provider="p", price={"per_million": {"input": "1", "output": "3"}})
    assert batch_rates(own, D("0.5")).output.base == D("1.5")
    with pytest.raises(PricingError, match="no batch price known"):
        batch_rates(own)
    hosted = ModelConfig(name="s", provider="p", price={"self_hosted": {"gpu_hour_usd": "3.6"}},
                         throughput={"output_tokens_per_s": 100})
    assert batch_rates(hosted).output == PriceBook([hosted]).rates("s").output


def test_replay_builds_the_policy_the_gateway_builds() -> None:
    """One conversion of margin.yaml for both (margin.wiring): replay's targets, groups and
    reference models are the gateway's."""
    from margin.gateway.app import MarginApp

    data = {k: v for k, v in copy.deepcopy(BASE).items() if k != "replay"}
    data["budgets"] = [{"id": "b", "scope": {"team": "a"}, "limit_usd": "5", "period": "rolling", "rolling": "24h"}]
    data["ledger"] = {"url": "sqlite://:memory:"}
    pol = policy_from_dict(data)
    app = MarginApp(parse_config(data))
    assert pol.targets == app.targets and pol.groups == app.groups
    assert pol.budgets == app.guard.budgets
    assert {g: pol.reference(g) for g in pol.groups} == app.pipeline.references


def test_learned_and_weighted_groups(tmp_path: Path) -> None:
    import numpy as np

    from margin.replay.policy import load_policy
    from margin.router import save_router
    from margin.router import train as T
    from margin.router.data import RoutingTable

    prompts = [f"what is {i} plus {i}" for i in range(40)] + [f"prove theorem {i} about primes" for i in range(40)]
    scores = np.stack([np.array([1.0] * 40 + [0.0] * 40), np.ones(80)], axis=1)
    table = RoutingTable(prompts, ["weak", "strong"], scores, np.tile([0.001, 0.01], (80, 1)))
    save_router(T.make_router("tfidf-lr", table.models).fit(table.prompts, table.scores), tmp_path / "r",
                costs={"weak": 0.001, "strong": 0.01}, operating_point={"rule": "lambda", "value": 20.0},
                training=table.summary())
    data = copy.deepcopy(BASE)
    data["groups"] = [
        {"name": "smart", "candidates": ["small", "big"], "strategy": "learned", "router": "r",
         "router_models": {"weak": "small", "strong": "big"}},
        {"name": "split", "candidates": ["small", "big"], "strategy": "weighted", "weights": {"small": 3, "big": 1}}]
    data["replay"] = {"model": "smart"}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(data))
    lines = [{"t": i, "prompt": p, "output_tokens": 10} for i, p in
             enumerate(["what is 3 plus 3", "prove theorem 9 about primes", "what is 7 plus 7"])]
    (tmp_path / "t.jsonl").write_text("".join(f"{orjson_line(x)}\n" for x in lines))
    o = replay(read_trace(tmp_path / "t.jsonl"), load_policy(tmp_path / "p.yaml"))  # router path: beside the policy
    assert [o.models[m] for m in o.served] == ["small", "big", "small"]
    assert all("learned" in o.routed.reasons[k] for k in o.routed.reason)
    many = tmp_path / "many.jsonl"
    many.write_text("".join(f'{{"t": {i}, "input_tokens": 100, "output_tokens": 10}}\n' for i in range(4000)))
    data["replay"] = {"model": "split", "seed": 7}
    o = replay(read_trace(many), policy_from_dict(data, "x"))
    share = float((o.served == o.models.index("small")).mean())
    assert 0.72 < share < 0.78 and o.routed.decide_calls == 4000


def orjson_line(x: dict[str, Any]) -> str:
    import orjson

    return orjson.dumps(x).decode()
