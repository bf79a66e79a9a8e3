"""Scenario planning: the issue's worked example to the cent, self-hosted capacity and cost, hybrids,
break-even, the CLI (`margin plan ...`) and a scenario built from a real ledger."""

from __future__ import annotations

import subprocess
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import yaml

from margin.planner.economics import Planner, plan
from margin.planner.perf import deployment, throughput
from margin.planner.scenario import ScenarioError, build, parse
from tests.conftest import PY, SHARED_DATA, Gateway

REPO = Path(__file__).resolve().parents[1]
WORKED = {
    "name": "worked example",
    "workload": {"requests_per_day": 2_000_000, "input_tokens": 1500, "output_tokens": 500},
    "options": [{"kind": "api", "name": "api", "price_per_1k_tokens": "0.002"}],
}


def margin(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, "-m", "margin.cli.main", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def run_plan(doc: dict[str, Any]) -> dict[str, Any]:
    return plan(build(parse(doc)))


def test_the_issues_worked_example_exactly() -> None:
    # 2M queries/day x 2,000 tokens x 30 days = 120B tokens/month; $0.002 per 1K tokens = $240,000 a
    # month, $2.88M a year; a 3x efficiency gain: $960,000 a year, under $1M.
    r = run_plan(WORKED)
    assert r["workload"]["tokens_per_month"] == 120_000_000_000
    row = r["options"][0]
    assert row["monthly_usd"] == "240000.00"
    assert row["yearly_usd"] == "2880000.00"
    assert row["usd_per_1m_tokens"] == "2.0000"
    assert row["usd_per_request"] == "0.004000"
    assert row["sensitivity_yearly"] == {"2x": "1440000.00", "3x": "960000.00", "5x": "576000.00"}
    assert Decimal(row["sensitivity_yearly"]["3x"]) < 1_000_000


def test_api_prices_come_from_genai_prices_with_cache_reads() -> None:
    doc = {**WORKED, "workload": {**WORKED["workload"], "prefix_hit_rate": 0.5, "cache_hit_rate": 0.1},
           "options": [{"kind": "api", "name": "mini", "model": "openai/gpt-4o-mini"}]}
    row = run_plan(doc)["options"][0]
    # gpt-4o-mini: $0.15 input, $0.075 cached input, $0.60 output per 1M; 10% of calls answered by the cache.
    served = Decimal(2_000_000 * 30) * Decimal("0.9")
    expect = served * (750 * Decimal("0.15") + 750 * Decimal("0.075") + 500 * Decimal("0.6")) / 1_000_000
    assert Decimal(row["monthly_usd"]) == expect.quantize(Decimal("0.01"))
    assert "genai-prices" in row["price"]


def _self_hosted(**kw: Any) -> dict[str, Any]:
    return {"kind": "self_hosted", "name": "8b", "model": "llama-3.1-8b", "gpu": "h100-sxm", "precision": "fp8",
            "kv_precision": "fp8", "ttft_slo_s": 1.0, "tpot_slo_s": 0.05, **kw}


def test_self_hosted_sizing_cost_and_energy() -> None:
    doc = {"name": "sh", "workload": {"requests_per_day": 2_000_000, "input_tokens": 1500, "output_tokens": 500,
                                      "diurnal": "business"},
           "options": [_self_hosted(), _self_hosted(name="8b auto", autoscale=True),
                       _self_hosted(name="8b owned", billing="owned")]}
    sc = build(parse(doc))
    rows = {r["option"]: r for r in plan(sc)["options"]}
    tr = throughput(deployment("llama-3.1-8b", "h100-sxm", 1, "fp8", "fp8"), 1500, 500, ttft_slo=1.0, tpot_slo=0.05)
    peak_rps = 2_000_000 / 86400 * max(sc.workload.hourly)
    import math

    replicas = math.ceil(peak_rps / (tr.requests_per_s * 0.85))
    static = rows["8b"]
    assert static["gpus_peak"] == replicas
    assert Decimal(static["monthly_usd"]) == Decimal(replicas * 24 * 30) * Decimal("4.00")
    assert rows["8b auto"]["gpus_peak"] == replicas
    assert Decimal(rows["8b auto"]["monthly_usd"]) < Decimal(static["monthly_usd"])  # follows the curve
    assert rows["8b auto"]["utilisation"] > static["utilisation"]
    owned = Decimal(rows["8b owned"]["monthly_usd"])
    capex = Decimal(replicas) * Decimal(40000) / Decimal(3 * 365 * 24) * 720
    assert capex < owned < capex + Decimal(rows["8b owned"]["kwh_per_month"]) * Decimal("0.10") + 1
    for r in rows.values():
        assert r["kwh_per_month"] > 0 and 0 < r["j_per_token"] < 1 and r["co2_kg_per_month"] > 0
        assert r["p99_ttft_s"] > 0 and r["p99_tpot_s"] > 0
        assert set(r["sensitivity"]) == {"2x", "3x", "5x"}
    assert static["co2_kg_per_month"] == pytest.approx(static["kwh_per_month"] * 0.4, rel=1e-3)


def test_hybrid_is_the_sum_of_its_parts_and_break_even_is_where_costs_cross() -> None:
    doc = {"name": "hy", "workload": {"requests_per_day": 200_000, "input_tokens": 1000, "output_tokens": 300,
                                      "cheap_share": 0.7},
           "options": [{"kind": "api", "name": "api", "price_per_million": {"input": "2.5", "output": "10"}},
                       _self_hosted(),
                       {"kind": "hybrid", "name": "mix", "parts": [{"option": "8b", "share": "cheap"},
                                                                   {"option": "api", "share": "rest"}]}]}
    sc = build(parse(doc))
    p = Planner(sc)
    w = sc.workload
    mix = p.cost("mix", w).monthly_usd
    assert mix == p.monthly("api", w.requests_per_day * 0.3) + p.monthly("8b", w.requests_per_day * 0.7)
    r = plan(sc)
    be = {(b["a"], b["b"]): b for b in r["break_even"]}
    v = be[("api", "8b")]["requests_per_day"]
    assert v < 200_000 and be[("api", "8b")]["cheaper_above"] == "8b"
    assert p.monthly("api", v * 0.98) < p.monthly("8b", v * 0.98)
    assert p.monthly("api", v * 1.02) > p.monthly("8b", v * 1.02)


@pytest.mark.parametrize(("patch", "message"), [
    ({"workload": {"requests_per_day": 10}}, "give input_tokens and output_tokens"),
    ({"options": [{"kind": "api", "name": "x"}]}, "give exactly one of model, price_per_million"),
    ({"options": [{"kind": "gpu", "name": "x"}]}, "options.0"),
    ({"workload": {**WORKED["workload"], "diurnal": [1, 2]}}, "diurnal: 24"),
    ({"workload": {**WORKED["workload"], "cache_hit_rate": 1.5}}, "workload.cache_hit_rate"),
    ({"options": [{"kind": "hybrid", "name": "h", "parts": [{"option": "a", "share": 0.5},
                                                            {"option": "b", "share": 0.5}]}]}, "no option named 'a'"),
    ({"surprise": 1}, "surprise: Extra inputs are not permitted"),
])
def test_bad_scenarios_say_what_is_wrong(patch: dict[str, Any], message: str) -> None:
    with pytest.raises(ScenarioError, match=message):
        build(parse({**WORKED, **patch}))


def test_self_hosted_option_that_cannot_run_is_named() -> None:
    doc = {**WORKED, "options": [_self_hosted(model="llama-3.1-405b", precision="bf16")]}
    with pytest.raises(ScenarioError, match=r"option '8b': llama-3.1-405b in bf16 needs 811.7 GB"):
        run_plan(doc)


def test_cli_plan_scenario_json_and_plots(tmp_path: Path) -> None:
    out = margin("plan", "docs/scenarios/workflow_2m.yaml", "--json", "--png", str(tmp_path))
    assert out.returncode == 0, out.stderr
    r = orjson.loads(out.stdout)
    names = [o["option"] for o in r["options"]]
    assert names[0] == "API $0.002/1K tokens" and r["options"][0]["yearly_usd"] == "2880000.00"
    assert any(o["kind"] == "hybrid" for o in r["options"]) and r["break_even"]
    pngs = sorted(p.name for p in tmp_path.iterdir())
    assert pngs == ["planner_2m_queries_day_workflow_users.png", "planner_2m_queries_day_workflow_volume.png"]
    assert all((tmp_path / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    table = margin("plan", "docs/scenarios/agentic_10_calls.yaml")
    assert table.returncode == 0, table.stderr
    assert "break-even" in table.stdout and "$/task" in table.stdout


def test_cli_plan_on_the_azure_trace(tmp_path: Path) -> None:
    doc = yaml.safe_load((REPO / "docs/scenarios/chatbot_azure.yaml").read_text())
    doc["workload"]["trace"] = str(SHARED_DATA / "traces" / "azure2023_conv.csv")
    path = tmp_path / "chat.yaml"
    path.write_text(yaml.safe_dump(doc))
    out = margin("plan", str(path), "--json")
    assert out.returncode == 0, out.stderr
    w = orjson.loads(out.stdout)["workload"]
    assert w["input_tokens"] == pytest.approx(1155, abs=5) and w["output_tokens"] == pytest.approx(211, abs=5)
    assert w["requests_per_day"] == pytest.approx(5.5 * 86400, rel=0.05)
    assert w["input_p99"] > w["input_tokens"]


def test_cli_throughput_json_and_errors() -> None:
    out = margin("plan", "throughput", "--model", "llama-3.1-8b", "--gpu", "h100-sxm", "--gpus", "4", "--precision",
                 "fp8", "--isl", "1000", "--osl", "1000", "--ttft-slo", "0.5", "--tpot-slo", "0.03", "--json")
    assert out.returncode == 0, out.stderr
    r = orjson.loads(out.stdout)
    for k in ("output_tokens_per_s", "ttft_s", "tpot_s", "batch", "joules_per_token"):
        assert r[k] > 0, k
    assert r["replicas"] == 4 and r["tpot_s"] <= 0.03
    one = orjson.loads(margin("plan", "throughput", "--model", "llama-3.1-8b", "--gpu", "h100-sxm", "--precision",
                              "fp8", "--isl", "1000", "--osl", "1000", "--ttft-slo", "0.5", "--tpot-slo", "0.03",
                              "--json").stdout)
    assert r["output_tokens_per_s"] == pytest.approx(4 * one["output_tokens_per_s"])
    bad = margin("plan", "throughput", "--model", "gpt-9", "--gpu", "h100-sxm", "--isl", "1", "--osl", "1")
    assert bad.returncode == 2 and "unknown model 'gpt-9'" in bad.stderr and "Traceback" not in bad.stderr
    big = margin("plan", "throughput", "--model", "llama-3.1-70b", "--gpu", "l4", "--isl", "10", "--osl", "10")
    assert big.returncode == 2 and "raise --tp or use a smaller precision" in big.stderr
    missing = margin("plan", "nope.yaml")
    assert missing.returncode == 2 and "nope.yaml: no such scenario file" in missing.stderr


def test_cli_bad_scenario_is_one_line(tmp_path: Path) -> None:
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump({**WORKED, "options": [{"kind": "api", "name": "x", "model": "nobody/nothing"}]}))
    out = margin("plan", str(p))
    assert out.returncode == 2 and "genai-prices has no price for 'nobody/nothing'" in out.stderr
    assert "Traceback" not in out.stderr


def test_cli_catalogues_and_calibration() -> None:
    models = orjson.loads(margin("plan", "models", "--json").stdout)
    assert {m["id"] for m in models} >= {"llama-2-70b", "llama-3.1-405b", "mixtral-8x7b", "gemma-3-270m"}
    gpus = orjson.loads(margin("plan", "gpus", "--json").stdout)
    assert {g["id"] for g in gpus} >= {"h100-sxm", "h200", "b200", "a100-80gb", "l4", "mi300x", "this-cpu"}
    cal = orjson.loads(margin("plan", "calibration", "--json").stdout)
    assert all(0.75 <= r["ratio"] <= 1.33 for r in cal["rows"])


def test_from_ledger_builds_a_scenario_that_plans(gateway: Gateway, tmp_path: Path) -> None:
    key = gateway.create_key(org="acme", team="agents")["key"]
    for run in range(3):
        for step in range(4):
            r = httpx.post(gateway.base_url + "/chat/completions", timeout=30, headers={
                "Authorization": f"Bearer {key}", "X-Margin-Run-Id": f"task-{run}", "X-Margin-Step": str(step)},
                json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "plan my trip " * 20}]})
            assert r.status_code == 200, r.text
    gateway.events(expect=12)
    out_path = tmp_path / "from_ledger.yaml"
    out = margin("plan", "from-ledger", "--config", str(gateway.config), "--since", "1d", "--out", str(out_path),
                 "--json")
    assert out.returncode == 0, out.stderr
    doc = yaml.safe_load(out_path.read_text())
    w = doc["workload"]
    assert w["calls_per_task"] >= 4  # 3 runs of 4 calls (other tests in this module may add more)
    assert w["input_tokens"]["mean"] > 20 and w["output_tokens"]["mean"] > 0
    assert any(o.get("model") == "openai/gpt-4o-mini" for o in doc["options"])
    planned = margin("plan", str(out_path), "--json")
    assert planned.returncode == 0, planned.stderr
    assert len(orjson.loads(planned.stdout)["options"]) == len(doc["options"])
    empty = margin("plan", "from-ledger", "--config", str(gateway.config), "--since", "2099-01-01", "--out",
                   str(tmp_path / "x.yaml"))
    assert empty.returncode == 2 and "no successful metered calls" in empty.stderr
