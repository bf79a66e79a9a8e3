"""Agent run governance: the pure policy, then caps enforced by the running gateway (loops, call
counts, dollars under concurrency, tool calls, wall time, escalation webhooks)."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from margin.domain.budget import CounterState, RunCap
from margin.policy import agents
from tests.conftest import Gateway, Mock, gateway_config, start_gateway, stop
from tests.test_budgets_gateway import Webhook, webhook  # noqa: F401  (fixture)

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


# -- pure policy -------------------------------------------------------------------------------------

def test_message_hash_looks_at_the_newest_message_only() -> None:
    a = {"messages": [{"role": "user", "content": "plan"}, {"role": "tool", "content": "same result"}]}
    b = {"messages": [{"role": "system", "content": "x"}, {"role": "tool", "content": "same result"}]}
    c = {"messages": [{"role": "tool", "content": "another result"}]}
    assert agents.message_hash("chat", a) == agents.message_hash("chat", b) != agents.message_hash("chat", c)


def test_keys_round_trip_any_run_id() -> None:
    cap = RunCap("triage", max_calls=3)
    for run in ("r1", "case:42:retry", "ünïcode run"):
        assert agents.parse_key(agents.key(cap, "calls", run)) == ("triage", "calls", run)
    assert agents.parse_key("b:budget:team=x:1") is None


def test_plan_reserves_calls_repeats_and_dollars() -> None:
    cap = RunCap("c", max_calls=5, max_repeats=2, max_usd=Decimal("0.50"))
    p = agents.plan([cap], "run-1", "abc", {}, {}, NOW)
    assert p.stop is None
    assert {h.key: (h.limit, h.amount, h.unit) for h in p.holds} == {
        "run:c:calls:run-1": (5, 1, "calls"), "run:c:h-abc:run-1": (2, 1, "calls")}
    assert [a.key for a in p.dollars] == ["run:c:usd:run-1"]
    assert p.dollars[0].budget.limit == Decimal("0.50")


def test_plan_stops_on_wall_time_and_tool_calls() -> None:
    wall = RunCap("w", max_wall_s=60)
    assert agents.plan([wall], "r", "", {}, {"w": NOW.timestamp() - 30}, NOW).stop is None
    stop = agents.plan([wall], "r", "", {}, {"w": NOW.timestamp() - 61}, NOW).stop
    assert stop is not None and stop.limit == "max_wall_s" and "61 s" in stop.message
    tools = RunCap("t", max_tool_calls=3)
    assert agents.plan([tools], "r", "", {"run:t:tools:r": CounterState(3)}, {}, NOW).stop is None
    stop = agents.plan([tools], "r", "", {"run:t:tools:r": CounterState(4)}, {}, NOW).stop
    assert stop is not None and stop.limit == "max_tool_calls"


def test_stop_messages_name_the_cap() -> None:
    cap = RunCap("triage", max_calls=3, max_repeats=2, max_usd=Decimal("0.1"))
    s = agents.stop_for("run:triage:calls:r9", [cap], CounterState(3))
    assert s is not None and s.limit == "max_calls" and "3 LLM calls" in s.message and "'triage'" in s.message
    s = agents.stop_for("run:triage:h-0f:r9", [cap], CounterState(2))
    assert s is not None and s.limit == "max_repeats" and "loop" in s.message
    s = agents.stop_for("run:triage:usd:r9", [cap], CounterState(99_000_000, 1_000_000))
    assert s is not None and s.limit == "max_usd" and "0.099 USD" in s.message


# -- through the gateway -----------------------------------------------------------------------------

TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}}}]


def test_recovered_counters_from_the_ledger() -> None:
    caps = [RunCap("c", scope=(("workflow", "triage"),), max_calls=5, max_usd=Decimal("0.50"), max_tool_calls=9,
                   ttl_s=3600), RunCap("w", scope=(("workflow", "triage"),), max_wall_s=60)]
    now = NOW.timestamp()
    triage = {"workflow": "triage"}
    calls = [agents.RunCall("r1", triage, now - 100, Decimal("0.10"), 2),
             agents.RunCall("r1", triage, now - 50, Decimal("0.000000001"), 0),
             agents.RunCall("r2", {"workflow": "other"}, now - 10, Decimal("1"), 1)]  # no cap covers it
    got = {h.key: (units, h.limit, h.unit, h.expires_at) for h, units in agents.recovered(caps, calls, now)}
    assert got == {
        "run:c:usd:r1": (100_000_001, 500_000_000, "usd", now - 50 + 3600 + 86400),
        "run:c:calls:r1": (2, 5, "calls", now - 50 + 3600),
        "run:c:tools:r1": (2, 9, "calls", now - 50 + 3600),
    }  # the wall-time cap has no counter: its clock is recovered_starts' (below)
    # A long run: a counter lives while the run keeps calling, however long ago it began...
    steady = [agents.RunCall("r3", triage, now - 3000 * i, Decimal("0.01"), 1) for i in range(10)]
    got = {h.key: units for h, units in agents.recovered(caps, steady, now)}
    assert got["run:c:calls:r3"] == 10 and got["run:c:usd:r3"] == 100_000_000
    # ... and restarts after a pause longer than ttl_s (the dollar counter only after ttl_s + a day)
    paused = [agents.RunCall("r4", triage, now - 5000, Decimal("0.01"), 1),
              agents.RunCall("r4", triage, now - 100, Decimal("0.02"), 1)]
    got = {h.key: units for h, units in agents.recovered(caps, paused, now)}
    assert got["run:c:calls:r4"] == 1 and got["run:c:usd:r4"] == 30_000_000
    # a run whose counters have all expired is left out
    over = [agents.RunCall("r5", triage, now - 100_000, Decimal("0.01"), 1)]
    assert agents.recovered(caps, over, now) == []
    # a call refused at admission took nothing from the counters
    refused = [*calls[:1], agents.RunCall("r1", triage, now - 20, Decimal(0), 0, admitted=False)]
    assert {h.key: u for h, u in agents.recovered(caps, refused, now)}["run:c:calls:r1"] == 1


def test_recovered_wall_clocks_from_the_ledger() -> None:
    """A run's clock started at its first call (admitted or not) and restarts after a pause longer than
    ttl_s, as `first_seen` holds it live."""
    wall = RunCap("w", scope=(("workflow", "triage"),), max_wall_s=60, ttl_s=600)
    now = NOW.timestamp()
    triage = {"workflow": "triage"}
    calls = [agents.RunCall("r1", triage, now - 500, Decimal(0), 0, admitted=False),
             agents.RunCall("r1", triage, now - 100, Decimal("0.1"), 0),
             agents.RunCall("r2", triage, now - 2000, Decimal("0.1"), 0),  # r2 paused > ttl_s, then went on
             agents.RunCall("r2", triage, now - 30, Decimal("0.1"), 0),
             agents.RunCall("r3", triage, now - 700, Decimal("0.1"), 0),  # r3's clock has expired
             agents.RunCall("r4", {"workflow": "other"}, now - 10, Decimal("0.1"), 0)]  # no cap covers it
    assert sorted(agents.recovered_starts([wall], calls, now)) == [
        ("run:w:start:r1", now - 500, now - 100 + 600), ("run:w:start:r2", now - 30, now - 30 + 600)]
    assert agents.recovered_starts([RunCap("c", max_calls=3)], calls, now) == []  # no wall-time limit


def test_a_restart_does_not_give_a_run_its_caps_anew(mock_upstream: Mock, tmp_path: Path) -> None:
    """In-memory counters start empty; the gateway sums running agents' calls and dollars from the
    ledger, and a run's wall-time clock keeps its first call's time."""
    caps = [{"id": "triage", "scope": {"workflow": "triage"}, "max_calls": 4},
            {"id": "pricey", "scope": {"workflow": "pricey"}, "max_usd": "0.002"},
            {"id": "quick", "scope": {"workflow": "quick"}, "max_wall_s": 3.0}]
    cfg = gateway_config(tmp_path, mock_upstream.url, f"sqlite:///{tmp_path}/l.db", run_caps=caps)
    gw = start_gateway(tmp_path, cfg)
    try:
        key = gw.create_key(team="support")["key"]
        assert [_chat(gw, key, "r", f"s{i}").status_code for i in range(3)] == [200] * 3
        spent = 0
        while (r := _chat(gw, key, "p", f"s{spent}", workflow="pricey", max_tokens=20)).status_code == 200:
            spent += 1
        assert spent >= 1 and _error(r)["param"] == "max_usd"
        assert _chat(gw, key, "q", "first", workflow="quick").status_code == 200
        started = time.monotonic()
        gw.events(expect=3 + spent + 2)  # in the ledger before the restart
    finally:
        assert gw.proc is not None
        stop(gw.proc)
    gw = start_gateway(tmp_path, cfg)
    try:
        time.sleep(max(0.0, 3.2 - (time.monotonic() - started)))
        r = _chat(gw, key, "q", "later", workflow="quick")  # over 3 s since the run's first call, before the restart
        assert r.status_code == 429 and _error(r)["param"] == "max_wall_s"
        assert [_chat(gw, key, "r", f"t{i}").status_code for i in range(2)] == [200, 429]  # 4 calls in all
        r = _chat(gw, key, "p", "again", workflow="pricey", max_tokens=20)
        assert r.status_code == 429 and _error(r)["param"] == "max_usd"
        assert _chat(gw, key, "fresh", "s0").status_code == 200  # another run starts at zero
    finally:
        assert gw.proc is not None
        stop(gw.proc)


def _chat(gw: Gateway, key: str, run: str, content: str, workflow: str = "triage", max_tokens: int | None = 12,
          **headers: str) -> httpx.Response:
    body: dict[str, Any] = {"model": "gpt-4o", "messages": [{"role": "user", "content": content}]}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    if headers.pop("tools", None):
        body["tools"] = TOOLS
    return httpx.post(gw.base_url + "/chat/completions", json=body, timeout=30, headers={
        "Authorization": f"Bearer {key}", "X-Margin-Run-Id": run, "X-Margin-Workflow": workflow, **headers})


@pytest.fixture
def capped(mock_upstream: Mock, tmp_path: Path, webhook: Webhook) -> Any:  # noqa: F811
    caps = [
        {"id": "triage", "scope": {"workflow": "triage"}, "max_calls": 6, "max_repeats": 3},
        {"id": "pricey", "scope": {"workflow": "pricey"}, "max_usd": "0.002"},
        {"id": "tools", "scope": {"workflow": "tools"}, "max_tool_calls": 4, "on_cap": "escalate",
         "webhook": webhook.url},
        {"id": "quick", "scope": {"workflow": "quick"}, "max_wall_s": 1.0},
    ]
    gw = start_gateway(tmp_path, gateway_config(tmp_path, mock_upstream.url, f"sqlite:///{tmp_path}/l.db",
                                                run_caps=caps))
    yield gw, webhook
    assert gw.proc is not None
    stop(gw.proc)


def _error(r: httpx.Response) -> dict[str, Any]:
    body: dict[str, Any] = r.json()["error"]
    return body


def test_loop_and_call_caps(capped: Any) -> None:
    gw, _ = capped
    key = gw.create_key(team="support")["key"]
    # The same tool result three times is allowed; the fourth is a loop.
    codes = [_chat(gw, key, "loop-1", "same result").status_code for _ in range(4)]
    assert codes == [200, 200, 200, 429]
    r = _chat(gw, key, "loop-1", "same result")
    err = _error(r)
    assert (r.status_code, err["code"], err["param"]) == (429, "run_limit_exceeded", "max_repeats")
    assert "'triage'" in err["message"] and "loop-1" in err["message"]
    # Six calls per run: distinct messages, the seventh is refused; another run is unaffected.
    codes = [_chat(gw, key, "run-2", f"step {i}").status_code for i in range(7)]
    assert codes == [200] * 6 + [429]
    assert _error(_chat(gw, key, "run-2", "step 8"))["param"] == "max_calls"
    assert _chat(gw, key, "run-3", "step 0").status_code == 200
    # Calls without a run id, or outside the scope, are never capped.
    assert _chat(gw, key, "", "same result").status_code == 200
    assert all(_chat(gw, key, "other", "same result", workflow="other").status_code == 200 for _ in range(5))
    stops = [e for e in gw.events(expect=31) if e["error_type"] == "run_limit_exceeded"]
    assert len(stops) == 4 and all(e["status"] == 429 and e["cost_usd"] == "0" for e in stops)


def test_dollar_cap_holds_under_concurrency(capped: Any) -> None:
    """A run's steps racing each other can never spend past its cap: every call's worst case is
    reserved first, so the call that would exceed it is refused before it is sent."""
    gw, _ = capped
    key = gw.create_key(team="support")["key"]

    async def fire() -> list[int]:
        async with httpx.AsyncClient(base_url=gw.base_url, timeout=30) as c:
            async def one(i: int) -> int:
                r = await c.post("/chat/completions", json={
                    "model": "gpt-4o", "max_tokens": 40,
                    "messages": [{"role": "user", "content": f"question {i} " * (i % 7 + 1)}]},
                    headers={"Authorization": f"Bearer {key}", "X-Margin-Run-Id": "spendy",
                             "X-Margin-Workflow": "pricey"})
                if r.status_code == 429:
                    assert r.json()["error"]["param"] == "max_usd"
                return r.status_code
            return await asyncio.gather(*(one(i) for i in range(40)))

    statuses = asyncio.run(fire())
    assert 200 in statuses and 429 in statuses and set(statuses) <= {200, 429}
    rows = [e for e in gw.events(expect=40) if e["run_id"] == "spendy"]
    spent = sum((Decimal(e["cost_usd"]) for e in rows), Decimal(0))
    assert len(rows) == 40 and Decimal(0) < spent <= Decimal("0.002")


def test_tool_call_cap_escalates_once_then_stops(capped: Any) -> None:
    gw, hook = capped
    key = gw.create_key(team="support")["key"]
    # Each answer asks for 2 tool calls: after three answers the run has issued 6 > 4.
    for i in range(3):
        r = _chat(gw, key, "agent-7", f"turn {i}", workflow="tools", tools=True, **{"X-Mock-Tool-Calls": "2"})
        assert r.status_code == 200 and len(r.json()["choices"][0]["message"]["tool_calls"]) == 2
    for _ in range(2):
        r = _chat(gw, key, "agent-7", "turn 9", workflow="tools", tools=True)
        assert r.status_code == 429 and _error(r)["param"] == "max_tool_calls"
    assert [e["tool_calls"] for e in gw.events(expect=5) if e["run_id"] == "agent-7"] == [2, 2, 2, 0, 0]
    deadline = time.monotonic() + 5
    while not hook.received and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    assert len(hook.received) == 1
    assert hook.received[0]["event"] == "run.cap" and hook.received[0]["run_id"] == "agent-7"
    assert hook.received[0]["limit"] == "max_tool_calls"


def test_streamed_tool_calls_are_counted(capped: Any) -> None:
    gw, _ = capped
    key = gw.create_key(team="support")["key"]
    body = {"model": "gpt-4o", "stream": True, "tools": TOOLS, "messages": [{"role": "user", "content": "go"}]}
    h = {"Authorization": f"Bearer {key}", "X-Margin-Run-Id": "agent-s", "X-Margin-Workflow": "tools",
         "X-Mock-Tool-Calls": "5"}
    with httpx.stream("POST", gw.base_url + "/chat/completions", json=body, headers=h, timeout=30) as r:
        assert r.status_code == 200 and "tool_calls" in r.read().decode()
    r = _chat(gw, key, "agent-s", "next", workflow="tools")
    assert r.status_code == 429 and _error(r)["param"] == "max_tool_calls"


def test_wall_time_cap(capped: Any) -> None:
    gw, _ = capped
    key = gw.create_key(team="support")["key"]
    assert _chat(gw, key, "slow-run", "a", workflow="quick").status_code == 200
    time.sleep(1.3)
    r = _chat(gw, key, "slow-run", "b", workflow="quick")
    assert r.status_code == 429 and _error(r)["param"] == "max_wall_s"
    assert _chat(gw, key, "fresh-run", "a", workflow="quick").status_code == 200


def test_run_caps_shared_by_replicas_on_redis(mock_upstream: Mock, tmp_path: Path) -> None:
    """Two replicas on one Redis see one run: its calls, tool calls and clock are counted once."""
    from tests.test_budgets_redis import REDIS, cluster

    caps = [{"id": "shared", "scope": {"workflow": "triage"}, "max_calls": 4, "max_tool_calls": 2,
             "max_wall_s": 1.5}]
    gws = cluster(tmp_path, mock_upstream, 2, state=REDIS, run_caps=caps)
    try:
        key = gws[0].create_key(team="support")["key"]
        run = f"redis-run-{time.time_ns()}"
        assert _chat(gws[0], key, run, "one").status_code == 200
        assert _chat(gws[1], key, run, "two", tools=True, **{"X-Mock-Tool-Calls": "3"}).status_code == 200
        r = _chat(gws[0], key, run, "three")  # the other replica's answer issued 3 tool calls > 2
        assert r.status_code == 429 and _error(r)["param"] == "max_tool_calls"
        run2 = run + "-b"
        codes = [_chat(gws[i % 2], key, run2, f"s{i}").status_code for i in range(5)]
        assert codes == [200, 200, 200, 200, 429]
        time.sleep(1.6)
        r = _chat(gws[1], key, run, "late")
        assert r.status_code == 429 and _error(r)["param"] == "max_wall_s"
    finally:
        for gw in gws:
            assert gw.proc is not None
            stop(gw.proc)


def test_run_counters_are_rebuilt_when_redis_loses_them(mock_upstream: Mock, tmp_path: Path) -> None:
    import redis

    from tests.test_budgets_redis import REDIS, cluster

    caps = [{"id": "lost", "scope": {"workflow": "triage"}, "max_calls": 4},
            {"id": "quick", "scope": {"workflow": "quick"}, "max_wall_s": 3.0}]
    (gw,) = cluster(tmp_path, mock_upstream, 1, state=REDIS, run_caps=caps)
    r = redis.Redis.from_url(REDIS, socket_timeout=5)
    try:
        key = gw.create_key(team="support")["key"]
        run = f"flushed-{time.time_ns()}"
        assert [_chat(gw, key, run, f"s{i}").status_code for i in range(3)] == [200] * 3
        assert _chat(gw, key, run, "first", workflow="quick").status_code == 200
        started = time.monotonic()
        gw.events(expect=4)
        r.delete(*r.keys("margin:*"))  # Redis back empty (a restart without persistence)
        deadline = time.monotonic() + 20
        while not r.exists("margin:ready"):  # the reconciler rebuilds the counters from the ledger
            assert time.monotonic() < deadline, "counters not rebuilt"
            time.sleep(0.1)
        assert [_chat(gw, key, run, f"t{i}").status_code for i in range(2)] == [200, 429]  # 4 calls in all
        time.sleep(max(0.0, 3.2 - (time.monotonic() - started)))
        r2 = _chat(gw, key, run, "later", workflow="quick")  # the run's clock came back with its first call's time
        assert r2.status_code == 429 and _error(r2)["param"] == "max_wall_s"
    finally:
        r.close()
        assert gw.proc is not None
        stop(gw.proc)


def test_admin_runs_show_runs_and_live_cap_counters(capped: Any) -> None:
    gw, _ = capped
    key = gw.create_key(team="support")["key"]
    for i in range(3):
        assert _chat(gw, key, "visible-run", f"step {i}").status_code == 200
    _chat(gw, key, "spender", "costly step", workflow="pricey")
    admin = {"Authorization": f"Bearer {gw.admin_key}"}
    gw.events(expect=4)
    listed = httpx.get(gw.url + "/admin/runs?since=1h&workflow=triage", headers=admin).json()["data"]
    run = next(r for r in listed if r["run_id"] == "visible-run")
    assert run["calls"] == 3 and run["workflow"] == "triage" and Decimal(run["cost_usd"]) > 0
    one = httpx.get(gw.url + "/admin/runs/visible-run", headers=admin).json()
    assert [s["step"] for s in one["steps"]] == [None, None, None] and len(one["steps"]) == 3
    cap = one["caps"][0]
    assert cap["cap"] == "triage" and cap["calls"] == {"used": 3, "limit": 6}
    spender = httpx.get(gw.url + "/admin/runs/spender", headers=admin).json()["caps"][0]
    assert spender["cap"] == "pricey" and Decimal(spender["usd"]["spent"]) > 0 and spender["usd"]["limit"] == "0.002"
    assert httpx.get(gw.url + "/admin/runs/nope", headers=admin).status_code == 404
    assert httpx.get(gw.url + "/admin/runs", headers={"Authorization": f"Bearer {key}"}).status_code == 401
