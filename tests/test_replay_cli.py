"""`margin replay` and `margin export trace` end to end: the CLI on hand-made traces, a real
gateway's ledger exported and replayed to the same cost, and a migration's shadow traffic sent
through a real gateway to the mock upstream."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
import typer
import yaml
from typer.testing import CliRunner

from margin.cli.main import app
from margin.cli.replay import export_trace
from margin.replay.traces import read_trace
from tests.conftest import PY, Gateway, Mock, free_port, gateway_config, start_gateway, stop

HERE = Path(__file__).parent / "data" / "traces"
runner = CliRunner()


def cli(*args: str) -> Any:
    return runner.invoke(app, ["replay", *args])


def test_replay_json_has_the_hand_computed_cost() -> None:
    r = cli(str(HERE / "tiny.jsonl"), "--policy", str(HERE / "tiny_policy.yaml"), "--json")
    assert r.exit_code == 0, r.output
    out = orjson.loads(r.stdout)
    assert Decimal(out["result"]["cost_usd"]) == Decimal("0.0899")
    assert out["baseline"] is None and out["diff"] is None


def test_replay_table_with_baseline_and_png(tmp_path: Path) -> None:
    base = tmp_path / "strong.yaml"
    data = yaml.safe_load((HERE / "tiny_policy.yaml").read_text())
    data["replay"]["model"] = "big"
    base.write_text(yaml.safe_dump(data))
    r = cli(str(HERE / "tiny.jsonl"), "-p", str(HERE / "tiny_policy.yaml"), "--baseline", str(base),
            "--png", str(tmp_path / "img"))
    assert r.exit_code == 0, r.output
    assert "what each lever saved" in r.stdout and "vs baseline" in r.stdout
    assert (tmp_path / "img" / "replay_tiny_cost.png").stat().st_size > 1000


@pytest.mark.parametrize(("args", "needle"), [
    (["/nope.csv", "--policy", "x.yaml"], "no such file"),
    ([str(HERE / "tiny.jsonl")], "--policy is required"),
    ([str(HERE / "tiny.jsonl"), "--policy", str(HERE / "tiny.jsonl")], "not valid YAML"),
    ([str(HERE / "tiny.jsonl"), "--policy", str(HERE / "tiny_policy.yaml"), "--rate-scale", "0"], "must be > 0"),
    ([str(HERE / "tiny.jsonl"), "--find-replicas"], "needs --ttft-slo"),
    ([str(HERE / "tiny.jsonl"), "--simulate", "--gpu", "tpu-v9"], "tpu-v9"),
    ([str(HERE / "tiny.jsonl"), "-p", str(HERE / "tiny_policy.yaml"), "--candidate", "gpt-9"], "not a model of"),
    ([str(HERE / "tiny.jsonl"), "-p", str(HERE / "tiny_policy.yaml"), "--candidate", "small", "--scorer", "fuzzy"],
     "use exact, numeric"),
])
def test_bad_input_is_a_one_line_error_and_exit_2(args: list[str], needle: str) -> None:
    r = cli(*args)
    assert r.exit_code == 2, r.output
    assert needle in r.output


def test_simulate_json() -> None:
    r = cli(str(HERE / "tiny_azure.csv"), "--simulate", "--replicas", "2", "--json")
    assert r.exit_code == 0, r.output
    out = orjson.loads(r.stdout)
    [run] = out["runs"]
    assert run["replicas"] == 2 and run["completed"] == 3 and run["ttft_s"]["p50"] > 0


def test_find_replicas_over_rate_scales(tmp_path: Path) -> None:
    r = cli(str(HERE / "tiny_azure.csv"), "--find-replicas", "--ttft-slo", "2", "--tpot-slo", "0.2",
            "--rate-scale", "1,100", "--json", "--png", str(tmp_path))
    assert r.exit_code == 0, r.output
    runs = orjson.loads(r.stdout)["runs"]
    assert [x["fewest_replicas"] for x in runs] == [1, 1]
    assert (tmp_path / "replay_sim_tiny_azure_replicas.png").exists()


def test_migration_priced_without_a_gateway() -> None:
    r = cli(str(HERE / "tiny.jsonl"), "-p", str(HERE / "tiny_policy.yaml"), "--candidate", "small",
            "--replace", "big", "--json")
    assert r.exit_code == 0, r.output
    out = orjson.loads(r.stdout)
    assert Decimal(out["priced"]["delta_usd"]) == Decimal("0.0109") - Decimal("0.0899")
    assert out["shadow"] is None


def test_module_runs_as_a_process() -> None:
    p = subprocess.run([PY, "-m", "margin.cli.main", "replay", str(HERE / "tiny.jsonl"), "--policy",
                        str(HERE / "tiny_policy.yaml"), "--json"], capture_output=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert orjson.loads(p.stdout)["result"]["requests"] == 4


# -- against real gateways --------------------------------------------------------------------

def export_app() -> typer.Typer:
    a = typer.Typer()
    a.command()(export_trace)
    return a


def test_ledger_export_replays_to_the_ledger_cost(gateway: Gateway, tmp_path: Path) -> None:
    k = gateway.create_key(org="acme", team="search", user="ana", tags={"workflow": "kyc"})
    c = openai.OpenAI(base_url=gateway.base_url, api_key=k["key"], max_retries=0)
    for i, model in enumerate(["gpt-4o-mini", "gpt-4o", "gpt-4o-mini", "gpt-4o"]):
        c.chat.completions.create(model=model, messages=[{"role": "user", "content": f"question {i} " * (i + 1)}],
                                  extra_headers={"X-Mock-Cached-Tokens": "4"} if i == 1 else {})
    rows = [r for r in gateway.events(k["key_id"], expect=4)]
    assert len(rows) == 4
    out = tmp_path / "ledger.jsonl"
    r = runner.invoke(export_app(), ["--since", "1h", "--out", str(out), "--config", str(gateway.config), "--json"])
    assert r.exit_code == 0, r.output
    assert orjson.loads(r.stdout)["requests"] >= 4
    tr = read_trace(out)
    mine = [i for i in range(len(tr)) if tr.attrs["key_id"][i] == k["key_id"]]
    assert [tr.attrs["team"][i] for i in mine] == ["search"] * 4
    assert tr.cached_input_tokens is not None and int(tr.cached_input_tokens[mine].sum()) == 4
    # The gateway's own config as the policy: the replay must cost what the ledger says, to the digit.
    policy = yaml.safe_load(gateway.config.read_text())
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump(policy))
    res = cli(str(out), "--policy", str(tmp_path / "policy.yaml"), "--json", "--by", "team")
    assert res.exit_code == 0, res.output
    result = orjson.loads(res.stdout)["result"]
    ledger = sum((Decimal(r["cost_usd"]) for r in gateway.events() if r["status"] == 200
                  and not r["parent_event_id"]), Decimal(0))
    assert Decimal(result["cost_usd"]) == ledger
    assert {x["team"] for x in result["by"]["rows"]} >= {"search"}


def test_export_includes_logged_payloads(gateway: Gateway, tmp_path: Path) -> None:
    from margin.domain import Attribution, Call
    from margin.gateway.payloads import PayloadLog

    k = gateway.create_key(team="qa", tags={"log_payloads": "true"})
    c = openai.OpenAI(base_url=gateway.base_url, api_key=k["key"], max_retries=0)
    messages = [{"role": "user", "content": "2 + 2 = ? my key is sk-abcdefghijklmnopqrstuvwx"}]
    answer = c.chat.completions.create(model="gpt-4o-mini", messages=messages,  # type: ignore[arg-type]
                                       temperature=0).choices[0].message.content or ""
    [ev] = gateway.events(k["key_id"], expect=1)

    async def log_payload() -> None:  # the gateway's own payload writer (what the pipeline calls)
        plog = PayloadLog(gateway.ledger_url)
        await plog.start()
        call = Call("chat", "gpt-4o-mini", False, Attribution(tags=(("log_payloads", "true"),)))
        plog.capture(call, ev["event_id"], {"model": "gpt-4o-mini", "messages": messages, "temperature": 0}, answer)
        await plog.flush()
        await plog.close()

    import asyncio

    asyncio.run(log_payload())
    out = tmp_path / "t.jsonl"
    r = runner.invoke(export_app(), ["--since", "1h", "--out", str(out), "--config", str(gateway.config), "--json"])
    assert r.exit_code == 0, r.output
    assert orjson.loads(r.stdout)["with_payloads"] >= 1
    line = next(x for x in map(orjson.loads, out.read_text().splitlines()) if x.get("event_id") == ev["event_id"])
    assert line["response"] == answer and line["temperature"] == 0
    assert line["messages"][0]["content"].startswith("2 + 2 = ?") and "sk-abcdef" not in out.read_text()
    tr = read_trace(out)
    assert tr.prompts is not None and tr.responses is not None and answer in tr.responses


@pytest.fixture(scope="module")
def sqlite_gateway(mock_upstream: Mock, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("replay-gw")
    gw = start_gateway(tmp, gateway_config(tmp, mock_upstream.url, f"sqlite:///{tmp}/margin.db"), free_port())
    yield gw
    assert gw.proc is not None
    stop(gw.proc)


def test_migration_shadow_traffic_through_a_real_gateway(sqlite_gateway: Gateway, tmp_path: Path) -> None:
    gw = sqlite_gateway
    k = gw.create_key(org="acme", team="platform")
    c = openai.OpenAI(base_url=gw.base_url, api_key=k["key"], max_retries=0)
    prompts = [f"what is {i} plus {i}?" for i in range(4)]
    # References: the candidate's own (deterministic) answers for two prompts, wrong ones for the others.
    refs = []
    for i, p in enumerate(prompts):
        answer = c.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": p}],
                                           temperature=0).choices[0].message.content or ""
        refs.append(answer if i % 2 == 0 else "something else entirely")
    trace = tmp_path / "shadow.jsonl"
    trace.write_text("".join(orjson.dumps({"t": i, "messages": [{"role": "user", "content": p}], "response": ref,
                                           "requested_model": "gpt-4o"}).decode() + "\n"
                             for i, (p, ref) in enumerate(zip(prompts, refs, strict=True))))
    policy = yaml.safe_load(gw.config.read_text())
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump(policy))
    r = cli(str(trace), "-p", str(tmp_path / "policy.yaml"), "--candidate", "gpt-4o-mini", "--gateway", gw.base_url,
            "--key", k["key"], "--scorer", "exact", "--sample", "4", "--json")
    assert r.exit_code == 0, r.output
    out = orjson.loads(r.stdout)
    shadow = out["shadow"]
    assert (shadow["sampled"], shadow["answered"], shadow["agreed"], shadow["errors"]) == (4, 4, 2, 0)
    assert shadow["agreement"] == 0.5 and Decimal(shadow["shadow_cost_usd"]) > 0
    assert Decimal(out["priced"]["delta_usd"]) < 0  # gpt-4o -> gpt-4o-mini is cheaper
    tagged = [e for e in gw.events(k["key_id"], expect=8) if orjson.loads(e["tags"] or "{}").get("shadow")]
    assert len(tagged) == 4 and all(e["model"] == "gpt-4o-mini" for e in tagged)
