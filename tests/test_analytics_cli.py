"""`margin report|forecast|export` as a user runs them: a real SQLite ledger, subprocesses, JSON
output checked against the ledger, bad input answered with exit code 2 and one line."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from margin.analytics.outcomes import counted
from tests.test_analytics_warehouse import build_ledger


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, list[dict[str, Any]], list[dict[str, Any]]]]:
    d = tmp_path_factory.mktemp("cli")
    url = f"sqlite:///{d}/l.db"
    rows, outs = build_ledger(url)
    cfg = {"providers": [{"name": "p", "kind": "openai", "base_url": "http://127.0.0.1:1/v1"}],
           "models": [{"name": "m", "provider": "p", "price": {"per_million": {"input": "1", "output": "2"}}}],
           "ledger": {"url": url},
           "budgets": [{"id": "legal-month", "scope": {"team": "legal"}, "limit_usd": "100"}],
           "workflows": [{"name": "triage", "outcome": "resolved ticket",
                          "baseline": {"cost_per_outcome_usd": "3.20", "label": "human L1"}},
                         {"name": "kyc", "baseline": {"human_minutes": 8, "hourly_usd": "24"}}]}
    (d / "margin.yaml").write_text(yaml.safe_dump(cfg))
    yield d, rows, outs


def margin(d: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "margin", *args, "--config", str(d / "margin.yaml")],
                          capture_output=True, text=True, cwd=d, timeout=300)


def test_report_by_team_model_still_works(env: tuple[Path, list[dict[str, Any]], list[dict[str, Any]]]) -> None:
    d, rows, _ = env
    r = margin(d, "report", "--since", "2026-10-01", "--by", "team,model", "--json")
    assert r.returncode == 0, r.stderr
    out = orjson.loads(r.stdout)
    assert sum(Decimal(x["cost_usd"]) for x in out["rows"]) == sum(Decimal(x["cost_usd"]) for x in rows)
    assert {x["team"] for x in out["rows"]} == {x["team"] for x in rows}
    table = margin(d, "report", "--since", "2026-10-01")
    assert table.returncode == 0 and "spend" in table.stdout and "saved by lever" in table.stdout
    csv = margin(d, "report", "spend", "--period", "2026-11", "--by", "tag:feature", "-f", "csv")
    assert csv.returncode == 0 and csv.stdout.startswith("tag:feature,requests")


def test_report_outcomes_json_and_png(env: tuple[Path, list[dict[str, Any]], list[dict[str, Any]]]) -> None:
    d, rows, outs = env
    r = margin(d, "report", "outcomes", "--period", "2026-11", "--json", "--png", str(d / "png"))
    assert r.returncode == 0, r.stderr
    wf = {x["workflow"]: x for x in orjson.loads(r.stdout)["workflows"]}
    latest = counted(outs)
    runs = {x["run_id"] for x in rows if x["run_id"] and x["workflow"] == "triage"}
    spend = sum((Decimal(x["cost_usd"]) for x in rows if x["run_id"] in runs), Decimal(0))
    ok = sum(1 for run in runs if latest.get(run, {}).get("status") == "success")
    assert Decimal(wf["triage"]["cost_per_outcome_usd"]) == spend / ok
    assert wf["triage"]["baseline"] == "human L1" and wf["triage"]["outcome"] == "resolved ticket"
    assert wf["kyc"]["baseline_cost_per_outcome_usd"] == "3.2"  # 8 minutes at $24/h
    assert (d / "png" / "cost_per_outcome.png").stat().st_size > 5000


def test_report_runs_and_one_run(env: tuple[Path, list[dict[str, Any]], list[dict[str, Any]]]) -> None:
    d, _, _ = env
    r = margin(d, "report", "runs", "--period", "2026-11", "--workflow", "kyc", "--limit", "5", "--json")
    assert r.returncode == 0, r.stderr
    got = orjson.loads(r.stdout)["rows"]
    assert len(got) == 5 and {x["workflow"] for x in got} == {"kyc"}
    costs = [Decimal(x["cost_usd"]) for x in got]
    assert costs == sorted(costs, reverse=True)
    one = margin(d, "report", "runs", "--run", got[0]["run_id"], "--json")
    steps = orjson.loads(one.stdout)["rows"]
    assert sum(Decimal(s["cost_usd"]) for s in steps) == costs[0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["report", "--by", "colour"], "dimension 'colour'"),
        (["report", "--since", "yesterday"], "--since 'yesterday'"),
        (["report", "outcomes", "--period", "2026-13"], "period '2026-13'"),
        (["report", "-f", "xml"], "--format must be table, json or csv"),
        (["export", "focus", "--period", "2026-11", "--out", "x.xlsx"], "must end in .csv or .parquet"),
        (["report", "runs", "--order", "size"], "order 'size'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(env: tuple[Path, list[dict[str, Any]], list[dict[str, Any]]],
                                          args: list[str], message: str) -> None:
    d, _, _ = env
    r = margin(d, *args)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_forecast_commands(env: tuple[Path, list[dict[str, Any]], list[dict[str, Any]]]) -> None:
    d, _, _ = env
    r = margin(d, "forecast", "backtest", "--synthetic-only", "--json")
    assert r.returncode == 0, r.stderr
    syn = orjson.loads(r.stdout)["rows"][0]
    assert syn["kind"] == "synthetic" and 0 < syn["mape_pct"] < 15
    a = margin(d, "forecast", "anomalies", "--at", "2026-11-20T12:00:00+00:00", "--json")
    assert a.returncode == 0, a.stderr
    assert orjson.loads(a.stdout)["at"].startswith("2026-11-20")


def test_export_focus_matches_the_ledger(env: tuple[Path, list[dict[str, Any]], list[dict[str, Any]]]) -> None:
    import duckdb

    d, rows, outs = env
    for ext in ("csv", "parquet"):
        out = d / f"spend.{ext}"
        r = margin(d, "export", "focus", "--period", "2026-11", "--out", str(out), "--json")
        assert r.returncode == 0, r.stderr
        summary = orjson.loads(r.stdout)
        con = duckdb.connect()
        src = f"read_csv('{out}', all_varchar = true)" if ext == "csv" else f"read_parquet('{out}')"
        got = con.execute(
            "SELECT count(*), sum(CAST(BilledCost AS DECIMAL(38, 24))), sum(CAST(ConsumedQuantity AS DECIMAL(38, 0))), "
            "sum(CAST(x_Requests AS INT)), sum(CAST(x_Runs AS INT)), sum(CAST(x_SuccessfulOutcomes AS INT)), "
            f"count(DISTINCT Tags) FROM {src}").fetchall()[0]
        served = [x for x in rows if x["model"]]
        billed = [x for x in served if x["cache_hit"] is None]
        assert got[0] == summary["rows"]
        assert got[1] == sum(Decimal(x["cost_usd"]) for x in billed) == Decimal(summary["billed_cost_usd"])
        assert got[2] == sum(x["input_tokens"] + x["output_tokens"] for x in billed)
        assert got[3] == len(served)
        assert got[4] == len({x["run_id"] for x in served if x["run_id"]})
        latest = counted(outs)
        assert got[5] == sum(1 for run in {x["run_id"] for x in served if x["run_id"]}
                             if latest.get(run, {}).get("status") == "success")
        assert got[6] == len({(x["team"], x["user"]) for x in served})  # attribution in Tags
        cols = [c[0] for c in con.execute(f"DESCRIBE SELECT * FROM {src}").fetchall()]
        assert {"BilledCost", "ChargePeriodStart", "SkuMeter", "Tags", "PricingUnit"} <= set(cols)
        assert [c for c in cols if not (c[0].isupper() or c.startswith("x_"))] == []
        meters = {m[0] for m in con.execute(f"SELECT DISTINCT SkuMeter FROM {src}").fetchall()}
        assert meters == {"Input Tokens", "Cache Read Input Tokens", "Output Tokens"}


def test_export_of_an_empty_period_writes_the_columns(
        env: tuple[Path, list[dict[str, Any]], list[dict[str, Any]]]) -> None:
    d, _, _ = env
    out = d / "empty.csv"
    r = margin(d, "export", "focus", "--period", "2025-01", "--out", str(out))
    assert r.returncode == 0 and out.read_text().startswith("BilledCost,")


def test_missing_ledger_is_a_clear_error(tmp_path: Path) -> None:
    cfg = {"providers": [], "models": [], "ledger": {"url": "postgresql://nobody@127.0.0.1:1/none"}}
    (tmp_path / "margin.yaml").write_text(yaml.safe_dump(cfg))
    r = margin(tmp_path, "report", "--warehouse", ":memory:")
    assert r.returncode == 2 and "cannot read the ledger" in r.stderr

