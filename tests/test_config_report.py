"""Config validation messages, the report's arithmetic, and the CLI around them."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import orjson
import pytest
import yaml

from margin.analytics.report import parse_since, percentile, spend
from margin.config import ConfigError, load_config, parse_config

BASE = {"providers": [{"name": "p", "kind": "openai", "base_url": "http://127.0.0.1:1/v1"}],
        "models": [{"name": "m", "provider": "p", "price": {"genai_prices": "openai/gpt-4o-mini"}}]}


def test_env_vars_expand_with_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UPSTREAM_KEY", "sk-secret")
    cfg = parse_config({**BASE, "admin_key": "${ADMIN:-fallback}",
                        "providers": [{**BASE["providers"][0], "api_key": "${UPSTREAM_KEY}"}]})
    assert cfg.providers[0].api_key == "sk-secret" and cfg.admin_key == "fallback"


def test_missing_env_var_is_named() -> None:
    with pytest.raises(ConfigError, match="NOPE_NOT_SET is not set"):
        parse_config({**BASE, "admin_key": "${NOPE_NOT_SET}"})


@pytest.mark.parametrize(
    ("patch", "fragment"),
    [
        ({"models": [{"name": "m", "provider": "ghost"}]}, "unknown provider 'ghost'"),
        ({"models": [{"name": "m", "provider": "p", "price": {}}]}, "exactly one of"),
        ({"models": [{"name": "m", "provider": "p", "price": {"self_hosted": {"gpu_hour_usd": 2}}}]},
         "needs `throughput`"),
        ({"providers": [{"name": "p", "kind": "openai"}]}, "needs base_url"),
        ({"providers": [{"name": "p", "kind": "llamacpp"}]}, "needs model_path or gguf_package"),
        ({"ledgr": {}}, "ledgr"),
    ],
)
def test_invalid_configs_say_where(patch: dict[str, object], fragment: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config({**BASE, **patch})
    assert fragment in str(e.value)


def test_config_check_cli(tmp_path: Path) -> None:
    path = tmp_path / "margin.yaml"
    path.write_text(yaml.safe_dump(BASE))
    r = subprocess.run([sys.executable, "-m", "margin", "config", "check", str(path)], capture_output=True, text=True)
    assert r.returncode == 0 and "0.15" in r.stdout and "genai-prices" in r.stdout
    path.write_text("providers: [")
    r = subprocess.run([sys.executable, "-m", "margin", "config", "check", str(path)], capture_output=True, text=True)
    assert r.returncode == 2 and "not valid YAML" in r.stderr
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "missing.yaml")


def row(team: str, model: str, cost: str, latency: float, status: int = 200, **kw: object) -> dict[str, object]:
    return {"team": team, "model": model, "cost_usd": cost, "latency_ms": latency, "status": status,
            "input_tokens": 10, "output_tokens": 5, "ts_start": "2026-11-20T10:00:00+00:00",
            "tags": orjson.dumps(kw.get("tags", {})).decode(), **{k: v for k, v in kw.items() if k != "tags"}}


def test_spend_groups_sums_exactly_and_orders_by_cost() -> None:
    rows = [row("a", "x", "0.1", 10), row("a", "x", "0.2", 30), row("b", "y", "0.00000001", 5, 502),
            row("a", "x", "0.000000003", 20)]
    out = spend(rows, ["team", "model"])
    assert out[0]["team"] == "a" and Decimal(out[0]["cost_usd"]) == Decimal("0.300000003")
    assert out[0]["requests"] == 3 and out[0]["p50_ms"] == 20 and out[0]["p95_ms"] == 30
    assert out[1]["error_rate"] == 1.0 and out[1]["cost_usd"] == "0.00000001"


def test_spend_by_tag_and_day() -> None:
    rows = [row("a", "x", "1", 1, tags={"workflow": "kyc"}), row("a", "x", "2", 1, tags={})]
    out = {r["tag:workflow"]: r for r in spend(rows, ["tag:workflow", "day"])}
    assert out["kyc"]["cost_usd"] == "1" and out[""]["day"] == "2026-11-20"


def test_percentile_is_nearest_rank() -> None:
    assert percentile([], 0.5) is None
    assert percentile([5.0], 0.95) == 5.0
    assert percentile([float(i) for i in range(1, 101)], 0.95) == 95.0
    assert percentile([float(i) for i in range(1, 101)], 0.5) == 50.0


def test_parse_since() -> None:
    now = datetime(2026, 11, 22, tzinfo=UTC)
    assert parse_since("7d", now) == now - timedelta(days=7)
    assert parse_since("30m", now) == now - timedelta(minutes=30)
    assert parse_since("2026-11-01", now) == datetime(2026, 11, 1, tzinfo=UTC)
    with pytest.raises(ValueError, match="use 30m"):
        parse_since("yesterday", now)


def test_shipped_deployment_configs_are_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    """deploy/: the example file and the Kubernetes ConfigMap's margin.yaml load as `margin serve` would."""
    for var in ("MARGIN_ADMIN_KEY", "OPENAI_API_KEY", "MARGIN_LEDGER_URL", "MARGIN_STATE_URL"):
        monkeypatch.setenv(var, "redis://127.0.0.1:6379/0" if var == "MARGIN_STATE_URL" else
                           "sqlite:///x.db" if var == "MARGIN_LEDGER_URL" else "sk-x")
    deploy = Path(__file__).parent.parent / "deploy"
    load_config(deploy / "margin.yaml.example")
    docs = list(yaml.safe_load_all((deploy / "kubernetes" / "margin.yaml").read_text()))
    config_map = next(d for d in docs if d and d.get("kind") == "ConfigMap")
    parse_config(yaml.safe_load(config_map["data"]["margin.yaml"]), "kubernetes ConfigMap")
