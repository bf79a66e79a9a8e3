"""Compression, cascade escalations and agent run caps in a replay, on tiny hand-written traces.
Every number is worked out by hand from tests/data/traces/tiny_policy.yaml's per-million prices
(small: $1 in, $2 out; big: $10 in, $30 out) and pricing/tokens.py's counting rules (a word of at
most 6 letters is one token, a message adds 4, a chat adds 3)."""

from __future__ import annotations

import copy
import io
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from rich.console import Console

from margin.config import ConfigError
from margin.replay.engine import CACHE_HIT, RUN_STOPPED, SERVED, replay
from margin.replay.export import trace_lines
from margin.replay.policy import policy_from_dict
from margin.replay.report import print_result
from margin.replay.summary import LEVERS, summarise
from margin.replay.traces import read_trace

HERE = Path(__file__).parent / "data" / "traces"
BASE: dict[str, Any] = yaml.safe_load((HERE / "tiny_policy.yaml").read_text())
START = {"margin_trace": 1, "start": "2026-03-02T10:00:00Z"}


def D(x: str) -> Decimal:
    return Decimal(x)


def write(tmp_path: Path, lines: list[dict[str, Any]], header: dict[str, Any] | None = None) -> Path:
    p = tmp_path / "t.jsonl"
    p.write_bytes(b"".join(orjson.dumps(x) + b"\n" for x in [header or START, *lines]))
    return p


def run(tmp_path: Path, lines: list[dict[str, Any]], header: dict[str, Any] | None = None,
        **changes: Any) -> dict[str, Any]:
    data = copy.deepcopy(BASE)
    for k, v in changes.items():
        if k == "replay":
            data["replay"].update(v)
        else:
            data[k] = v
    r = summarise(replay(read_trace(write(tmp_path, lines, header)), policy_from_dict(data, "tiny")))
    # Whatever the levers, they telescope from the reference down to the cost exactly.
    assert set(r["levers"]) == set(LEVERS)
    assert sum((D(v) for v in r["levers"].values()), Decimal(0)) == D(r["reference_cost_usd"]) - D(r["cost_usd"])
    print_result(Console(file=io.StringIO(), width=200), r)  # the tables render
    return r


# -- compression ---------------------------------------------------------------------------------

def words(word: str, n: int) -> str:
    return " ".join([word] * n)


# 3 + (4 + 2) + 4 x (4 + 40) + (4 + 10) = 199 estimated tokens
CHAT = [{"role": "system", "content": "be brief"},
        {"role": "user", "content": words("alpha", 40)}, {"role": "assistant", "content": words("bravo", 40)},
        {"role": "user", "content": words("carol", 40)}, {"role": "assistant", "content": words("delta", 40)},
        {"role": "user", "content": words("echo", 10)}]


def with_compression(**compress: Any) -> list[dict[str, Any]]:
    models: list[dict[str, Any]] = copy.deepcopy(BASE["models"])
    models[0]["compress"] = {"max_input_tokens": 64, **compress}
    return models


def test_compression_drops_old_turns_and_scales_recorded_tokens(tmp_path: Path) -> None:
    lines = [{"t": 0, "messages": CHAT, "output_tokens": 10},  # input: the estimate, 199
             {"t": 60, "messages": CHAT, "output_tokens": 10, "input_tokens": 398}]  # the provider counted 398
    r = run(tmp_path, lines, models=with_compression(), replay={"model": "small", "reference_model": "small"})
    # The block of 4 oldest turns goes: system + newest turn = 3 + 6 + 14 = 23 tokens (of 199).
    # 1st: 23 in + 10 out = 43 micro-USD instead of 219; 2nd: 398 x 23/199 = 46 in, 66 instead of 418.
    assert r["tokens"]["input"] == 23 + 46 and r["tokens"]["saved_by_compression"] == 176 + 352
    assert D(r["cost_usd"]) == D("0.000109")
    assert D(r["levers"]["compression"]) == D("0.000528")
    assert {**r["compression"], "summary_cost_usd": D(r["compression"]["summary_cost_usd"])} == {
        "requests": 2, "tokens_saved": 528, "summaries": 0, "summary_cache_hits": 0, "summaries_refused": 0,
        "summary_cost_usd": 0}
    assert not any("compression" in n for n in r["notes"])


def test_compression_summaries_are_priced_calls_and_cached(tmp_path: Path) -> None:
    lines = [{"t": 0, "messages": CHAT, "output_tokens": 10}, {"t": 60, "messages": CHAT, "output_tokens": 10}]
    r = run(tmp_path, lines, models=with_compression(summarise_with="small", summary_max_tokens=16),
            cache={"enabled": True}, replay={"model": "small", "reference_model": "small"})
    # The summariser is sent policy/compress.summary_request: its system prompt (31 tokens) and the
    # dropped turns as "role: text" lines (42 + 43 + 42 + 43): 3 + (4 + 31) + (4 + 170) = 212 in, 16 out
    # (its cap) = 244 micro-USD, once: the second request's identical summary call is an exact-cache hit
    # (temperature 0), while the requests themselves (temperature unrecorded: 1) are not cacheable.
    # The prompt sent: 23 + a summary note (4 + 13 + 16) = 56 in, 76 micro-USD each.
    assert r["compression"]["summaries"] == 2 and r["compression"]["summary_cache_hits"] == 1
    assert D(r["compression"]["summary_cost_usd"]) == D("0.000244")
    assert D(r["cost_usd"]) == D("0.000396")  # 2 x 76 + 244
    assert D(r["levers"]["compression"]) == D("0.000042")  # 2 x 219 - 396
    small = next(m for m in r["by_model"] if m["model"] == "small")
    assert (small["requests"], small["side_calls"], small["cache_hits"]) == (2, 1, 1)
    assert any("summary_max_tokens" in n for n in r["notes"])


def test_a_refused_summary_leaves_the_compressed_prompt_without_one(tmp_path: Path) -> None:
    models = copy.deepcopy(BASE["models"])
    models[1]["compress"] = {"max_input_tokens": 64, "summarise_with": "small", "summary_max_tokens": 16}
    budget = {"id": "side", "scope": {"model": "small"}, "limit_usd": "0.0001", "period": "day"}
    r = run(tmp_path, [{"t": 0, "messages": CHAT, "output_tokens": 10}], models=models, budgets=[budget],
            replay={"model": "big"})
    # The summariser's worst case (212 in + 16 out on small = 244 micro-USD) exceeds the 100 its budget
    # allows: the gateway sends big the compressed prompt without a summary, 23 in + 10 out = 530 micro-USD
    # instead of 199 in + 10 out = 2290.
    assert r["compression"]["summaries_refused"] == 1 and r["budgets"][0]["blocks"] == 1
    assert D(r["cost_usd"]) == D("0.00053") and D(r["levers"]["compression"]) == D("0.00176")
    assert r["blocked"] == 0  # the request itself was served


def test_compression_needs_recorded_messages(tmp_path: Path) -> None:
    r = run(tmp_path, [{"t": 0, "input_tokens": 5000, "output_tokens": 10}], models=with_compression(),
            replay={"model": "small", "reference_model": "small"})
    assert D(r["levers"]["compression"]) == 0
    assert any(n.startswith("compression: not applicable") for n in r["notes"])


# -- cascades ------------------------------------------------------------------------------------

CASCADE = [{"name": "auto", "candidates": ["small", "big"], "strategy": "cascade", "verify_regex": r"^\d+$"}]
ASK = {"input_tokens": 1000, "output_tokens": 100, "team": "a"}  # small: 0.0012, big: 0.013


def test_cascade_escalations_at_a_configured_rate(tmp_path: Path) -> None:
    lines = [{"t": i, **ASK} for i in range(4)]
    r = run(tmp_path, lines, groups=CASCADE, replay={"cascade_escalation_rate": "0.5"})
    # Half of the 4 verified first steps escalate, spread evenly: the 1st and the 3rd.
    # 4 x small + 2 x big = 0.0048 + 0.026; the reference (big for all) is 0.052.
    assert D(r["cost_usd"]) == D("0.0308")
    assert D(r["levers"]["routing"]) == D("0.0472") and D(r["levers"]["cascade"]) == D("-0.026")
    (g,) = r["cascade"]
    assert (g["verified"], g["escalated"], g["by_rate"], g["rate"], g["rate_source"]) == (4, 2, 4, 0.5, "setting")
    assert D(g["escalation_cost_usd"]) == D("0.026") and g["escalation_calls"] == 2
    assert {m["model"]: (m["requests"], m["side_calls"]) for m in r["by_model"]} == {"small": (4, 0), "big": (0, 2)}


def test_cascade_rate_defaults_to_the_ledgers(tmp_path: Path) -> None:
    header = {**START, "cascade": {"auto": {"steps": 4, "escalated": 1}}}
    r = run(tmp_path, [{"t": i, **ASK} for i in range(4)], header, groups=CASCADE)
    # rate 1/4: only the 3rd of 4 escalates (floor(3/4 + 1/2) > floor(2/4 + 1/2))
    assert r["cascade"][0]["escalated"] == 1 and r["cascade"][0]["rate_source"] == "ledger"
    assert D(r["cost_usd"]) == D("0.0048") + D("0.013")
    unknown = run(tmp_path, [{"t": i, **ASK} for i in range(4)], groups=CASCADE)
    assert unknown["cascade"][0]["escalated"] == 0 and D(unknown["cost_usd"]) == D("0.0048")
    assert any("no rate known" in n for n in unknown["notes"])


def test_cascade_verdicts_recorded_or_checked_beat_the_rate(tmp_path: Path) -> None:
    lines = [{"t": 0, **ASK, "model": "small", "cascade_escalated": True},   # recorded: escalated
             {"t": 1, **ASK, "model": "small", "response": "42"},           # the group's regex accepts it
             {"t": 2, **ASK, "model": "small", "response": "forty-two"},    # ... and rejects this one
             {"t": 3, **ASK, "model": "big", "response": "forty-two"}]      # big's answer says nothing of small's
    r = run(tmp_path, lines, groups=CASCADE, replay={"cascade_escalation_rate": "0", "model": "auto"})
    g = r["cascade"][0]
    assert (g["by_recorded"], g["by_checks"], g["by_rate"], g["escalated"]) == (1, 2, 1, 2)
    assert D(r["cost_usd"]) == D("0.0048") + 2 * D("0.013")


def test_cascade_steps_are_not_cached_until_verified(tmp_path: Path) -> None:
    lines = [{"t": 0, **ASK, "prompt_hash": "p"}, {"t": 1, **ASK, "prompt_hash": "p"}]
    kept = run(tmp_path, lines, groups=CASCADE, cache={"enabled": True},
               replay={"cascade_escalation_rate": "0", "temperature": 0})
    assert kept["cache_hits"] == 0 and D(kept["cost_usd"]) == D("0.0024")  # a step to verify is never stored
    every = run(tmp_path, lines, groups=CASCADE, cache={"enabled": True},
                replay={"cascade_escalation_rate": "1", "temperature": 0})
    # Both first steps are paid; the 2nd request's escalation finds big's stored final answer.
    assert D(every["cost_usd"]) == 2 * D("0.0012") + D("0.013") and D(every["levers"]["exact_cache"]) == D("0.013")


def test_cascade_rate_errors_are_precise() -> None:
    data = copy.deepcopy(BASE)
    data["replay"]["cascade_escalation_rate"] = {"nope": "0.1"}
    with pytest.raises(ConfigError, match=r"cascade_escalation_rate names \['nope'\], which are not cascade groups"):
        policy_from_dict(data, "x")
    data["replay"]["cascade_escalation_rate"] = "1.5"
    with pytest.raises(ConfigError, match=r"replay\.cascade_escalation_rate"):
        policy_from_dict(data, "x")


def test_export_records_cascade_verdicts_and_the_ledgers_rate() -> None:
    def row(eid: str, reason: str, actions: list[Any], parent: str = "") -> dict[str, Any]:
        return {"event_id": eid, "ts_start": "2026-03-02T10:00:00+00:00", "requested_model": "auto", "model": "small",
                "status": 200, "route_reason": reason, "actions": orjson.dumps(actions).decode(),
                "parent_event_id": parent, "input_tokens": 10, "output_tokens": 5, "tool_calls": 2}

    rows = [row("1", "group auto: cascade step 1: cheapest fitting", [{"action": "cascade_escalate", "why": "x"}]),
            row("2", "group auto: cascade step 2 (x)", [], parent="1"),
            row("3", "group auto: cascade step 1: cheapest fitting", []),
            row("4", "cheapest of 2 fitting", [])]
    header, *lines = [orjson.loads(x) for x in trace_lines(rows)]
    assert header["cascade"] == {"auto": {"steps": 2, "escalated": 1}}
    assert [x.get("cascade_escalated") for x in lines] == [True, False, None]
    assert all(x["tool_calls"] == 2 for x in lines)


# -- run caps ------------------------------------------------------------------------------------

def agent(*calls: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"t": i, **ASK, "run_id": "r1", **c} for i, c in enumerate(calls)]


def caps(**limits: Any) -> list[dict[str, Any]]:
    return [{"id": "agent", **limits}]


def test_run_cap_on_calls_stops_the_run(tmp_path: Path) -> None:
    lines = [*agent({}, {}, {}), {"t": 5, **ASK, "run_id": "r2"}, {"t": 6, **ASK}]
    r = run(tmp_path, lines, run_caps=caps(max_calls=2), replay={"model": "small"})
    # r1's 3rd call is refused (run_limit_exceeded); r2 and the call without a run are not capped.
    assert r["run_stopped"] == 1 and D(r["cost_usd"]) == 4 * D("0.0012")
    assert D(r["levers"]["run_cap"]) == D("0.0012")
    runs = r["runs"]
    assert (runs["runs"], runs["stopped_runs"], runs["stopped_calls"], D(runs["avoided_usd"])) == (2, 1, 1, D("0.0012"))
    assert runs["by_cap"] == [{"cap": "agent", "limit": "max_calls", "runs": 1, "calls": 1,
                               "avoided_usd": "0.0012", "first": "2026-03-02T10:00:02+00:00"}]


def test_run_cap_in_dollars_is_planned_like_a_budget(tmp_path: Path) -> None:
    r = run(tmp_path, agent({}, {}, {}), run_caps=caps(max_usd="0.003"), replay={"model": "small"})
    # 0.0012 + 0.0012 spent; the 3rd call's input alone (0.001) leaves no output in the 0.0006 left.
    assert r["run_stopped"] == 1 and r["runs"]["by_cap"][0]["limit"] == "max_usd"
    assert D(r["cost_usd"]) == D("0.0024") and r["truncated"] == 0
    # The 2nd call had 0.0018 left: output capped at (0.0018 - 0.001) / $2 per M = 400 tokens >= 100.
    tight = run(tmp_path, agent({}, {}), run_caps=caps(max_usd="0.0021"), replay={"model": "small"})
    # 0.0009 left for the 2nd call: 1000 in (0.001) does not fit: stopped.
    assert tight["run_stopped"] == 1 and D(tight["cost_usd"]) == D("0.0012")


def test_run_caps_on_wall_time_tool_calls_and_repeats(tmp_path: Path) -> None:
    timed = [{**x, "t": t} for x, t in zip(agent({}, {}, {}), (0, 10, 40), strict=True)]
    r = run(tmp_path, timed, run_caps=caps(max_wall_s=30), replay={"model": "small"})
    assert r["runs"]["by_cap"][0]["limit"] == "max_wall_s" and r["run_stopped"] == 1
    tools = agent({"tool_calls": 2}, {"tool_calls": 1}, {})
    r = run(tmp_path, tools, run_caps=caps(max_tool_calls=2), replay={"model": "small"})
    assert r["runs"]["by_cap"][0]["limit"] == "max_tool_calls" and r["run_stopped"] == 1  # 3 > 2 before the 3rd
    same = [{"role": "user", "content": "list the files"}]
    loop = agent({"messages": same}, {"messages": same}, {"messages": [{"role": "user", "content": "done"}]})
    o = replay(read_trace(write(tmp_path, loop)), policy_from_dict(
        {**copy.deepcopy(BASE), "run_caps": caps(max_repeats=1), "replay": {"model": "small"}}, "tiny"))
    assert o.status.tolist() == [SERVED, RUN_STOPPED, SERVED]
    assert list(o.runs) == [("agent", "max_repeats")]


def test_run_caps_and_budgets_together(tmp_path: Path) -> None:
    budget = {"id": "team-a", "scope": {"team": "a"}, "limit_usd": "0.0025", "period": "day"}
    lines = [*agent({}, {}), {"t": 2, **ASK, "run_id": "r2"}]
    r = run(tmp_path, lines, run_caps=caps(max_calls=1), budgets=[budget], replay={"model": "small"})
    # r1's 2nd call is stopped by its run cap before the budget is asked; r2's call fits the budget.
    assert (r["run_stopped"], r["blocked"], r["served"]) == (1, 0, 2)
    assert r["budgets"][0]["max_spent"] == "0.002400000"


def test_cascade_escalations_count_against_run_caps(tmp_path: Path) -> None:
    r = run(tmp_path, agent({}, {}), groups=CASCADE, run_caps=caps(max_calls=2),
            replay={"cascade_escalation_rate": "1"})
    # Call 1: small, escalated to big (2 calls of the run); call 2's first step is refused.
    assert r["run_stopped"] == 1 and D(r["cost_usd"]) == D("0.0012") + D("0.013")
    assert D(r["levers"]["run_cap"]) == D("0.0012")


def test_exact_cache_hit_still_counts_as_a_run_call(tmp_path: Path) -> None:
    lines = agent({"prompt_hash": "p"}, {"prompt_hash": "p"}, {"prompt_hash": "q"})
    o = replay(read_trace(write(tmp_path, lines)), policy_from_dict(
        {**copy.deepcopy(BASE), "run_caps": caps(max_calls=2), "cache": {"enabled": True},
         "replay": {"model": "small", "temperature": 0}}, "tiny"))
    assert o.status.tolist() == [SERVED, CACHE_HIT, RUN_STOPPED]


@pytest.mark.parametrize(("trace", "replay_settings"), [
    ("tiny.jsonl", {"temperature": 0}), ("tiny_mooncake.jsonl", {"model": "small", "temperature": 0})])
def test_the_sequential_path_agrees_with_the_vectorised_one(trace: str, replay_settings: dict[str, Any]) -> None:
    """A rate limit that never binds sends every request through flow.py one by one; the exact
    cache and the prefix cache must come out as the grouped passes compute them."""
    data = copy.deepcopy(BASE)
    data["cache"] = {"enabled": True}
    data["replay"].update(replay_settings)
    fast = summarise(replay(read_trace(HERE / trace), policy_from_dict(data, "tiny")))
    data["rate_limits"] = [{"id": "loose", "rpm": 1_000_000}]
    one_by_one = summarise(replay(read_trace(HERE / trace), policy_from_dict(data, "tiny")))
    keep = ("cost_usd", "reference_cost_usd", "levers", "tokens", "by_model", "cache_hits")
    assert {k: one_by_one[k] for k in keep} == {k: fast[k] for k in keep}
    assert fast["cache_hits"] + fast["tokens"]["cached_input"] > 0  # something was cached


# -- a real gateway's cascade, exported and replayed -----------------------------------------------

def test_a_gateway_cascade_exported_replays_to_the_ledger_cost(mock_upstream: Any, tmp_path: Path) -> None:
    """An empty answer fails the cascade's check (`verify_regex: "."`), so the request asking the
    mock for no output escalates from gpt-4o-mini to gpt-4o. The export records that verdict and
    the ledger's rate; the replay of the export through the gateway's own config escalates the
    same request and costs what the ledger says, both steps included, to the digit."""
    import openai
    import typer
    from typer.testing import CliRunner

    from margin.cli.replay import export_trace
    from tests.conftest import gateway_config, start_gateway, stop

    cfg = gateway_config(tmp_path, mock_upstream.url, f"sqlite:///{tmp_path}/margin.db", groups=[
        {"name": "tiered", "candidates": ["gpt-4o-mini", "gpt-4o"], "strategy": "cascade", "verify_regex": "."}])
    gw = start_gateway(tmp_path, cfg)
    try:
        k = gw.create_key(team="qa")
        c = openai.OpenAI(base_url=gw.base_url, api_key=k["key"], max_retries=0)
        for i in range(4):
            c.chat.completions.create(model="tiered", messages=[{"role": "user", "content": f"question {i}"}],
                                      extra_headers={"X-Mock-Output-Tokens": "0"} if i == 1 else {})
        rows = gw.events(k["key_id"], expect=5)
        app = typer.Typer()
        app.command()(export_trace)
        out = tmp_path / "ledger.jsonl"
        r = CliRunner().invoke(app, ["--since", "1h", "--out", str(out), "--config", str(gw.config), "--json"])
        assert r.exit_code == 0, r.output
    finally:
        assert gw.proc is not None
        stop(gw.proc)
    header, *lines = [orjson.loads(x) for x in out.read_text().splitlines()]
    assert header["cascade"] == {"tiered": {"steps": 4, "escalated": 1}}
    assert [x["cascade_escalated"] for x in lines] == [False, True, False, False]
    res = summarise(replay(read_trace(out), policy_from_dict(yaml.safe_load(gw.config.read_text()), "gateway")))
    (g,) = res["cascade"]
    assert (g["verified"], g["escalated"], g["by_recorded"], g["rate_source"]) == (4, 1, 4, "ledger")
    ledger = sum((Decimal(x["cost_usd"]) for x in rows if x["status"] == 200), Decimal(0))
    assert Decimal(res["cost_usd"]) == ledger and D(res["levers"]["cascade"]) < 0


def test_trace_reads_runs_tool_calls_verdicts_and_the_header(tmp_path: Path) -> None:
    from margin.replay.traces import TraceError

    header = {**START, "cascade": {"auto": {"steps": 3, "escalated": 1}}}
    tr = read_trace(write(tmp_path, [{"t": 1, **ASK, "run_id": "r", "tool_calls": 3, "cascade_escalated": False},
                                     {"t": 0, **ASK}], header))
    # sorted by time: the line without a run comes first
    assert tr.attrs["run_id"].tolist() == ["", "r"] and tr.tool_calls is not None and tr.tool_calls.tolist() == [0, 3]
    assert tr.escalated is not None and tr.escalated.tolist() == [-1, 0]
    assert tr.meta["cascade"] == {"auto": {"steps": 3, "escalated": 1}}
    with pytest.raises(TraceError, match=r"t\.jsonl:2: 'cascade_escalated' must be true or false"):
        read_trace(write(tmp_path, [{"t": 0, **ASK, "cascade_escalated": "yes"}]))
    with pytest.raises(TraceError, match=r"'tool_calls' must be a non-negative integer"):
        read_trace(write(tmp_path, [{"t": 0, **ASK, "tool_calls": -1}]))
