"""Issue 6 end to end: a scripted agent (the `openai` SDK in a loop with tool-call steps) runs 20
cases against the gateway and mock upstreams; some fail and are retried as new runs; outcomes are
posted (some late). The reported cost per successful outcome must equal the ledger's exact Decimal
sum of the workflow's spend divided by its successes."""

from __future__ import annotations

import json
import subprocess
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai

from tests.conftest import Mock, gateway_config, start_gateway, stop

TOOLS = [{"type": "function", "function": {"name": "lookup_order", "description": "Find an order",
                                           "parameters": {"type": "object", "properties": {"id": {"type": "string"}}}}}]


def _run_case(client: openai.OpenAI, run_id: str, case: int, fail: bool) -> str:
    """One agent run: plan with a tool call, run the tool, answer. Returns the outcome status."""
    h = {"X-Margin-Run-Id": run_id, "X-Margin-Workflow": "triage", "X-Margin-Agent": "support-bot"}
    messages: list[dict[str, Any]] = [{"role": "system", "content": "You resolve support tickets."},
                                      {"role": "user", "content": f"Ticket {case}: where is my order {case}?"}]
    try:
        first = client.chat.completions.create(
            model="gpt-4o-mini", messages=messages, tools=TOOLS, max_tokens=30,  # type: ignore[arg-type]
            extra_headers={**h, "X-Margin-Step": "plan", "X-Mock-Tool-Calls": "1"})
        call = first.choices[0].message.tool_calls[0]  # type: ignore[index]
        messages += [first.choices[0].message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": f"order {case}: shipped"}]
        extra = {"X-Mock-Status": "500"} if fail else {}  # the provider breaks on this run's last step
        client.chat.completions.create(model="gpt-4o", messages=messages, max_tokens=40,  # type: ignore[arg-type]
                                       extra_headers={**h, "X-Margin-Step": "answer", "X-Margin-Tool": "lookup_order",
                                                      **extra})
    except openai.APIError:
        return "failure"
    return "escalated" if case % 7 == 3 else "success"


def test_cost_per_successful_outcome_is_exact(mock_upstream: Mock, tmp_path: Path) -> None:
    cfg = gateway_config(tmp_path, mock_upstream.url, f"sqlite:///{tmp_path}/ledger.db",
                         workflows=[{"name": "triage", "outcome": "resolved ticket",
                                     "baseline": {"cost_per_outcome_usd": "2.00", "label": "human L1 agent"}}])
    gw = start_gateway(tmp_path, cfg)
    try:
        key = gw.create_key(team="support", app="helpdesk")["key"]
        client = openai.OpenAI(base_url=gw.base_url, api_key=key, max_retries=0)
        outcomes: list[dict[str, Any]] = []
        for case in range(20):
            run_id = f"case-{case}"
            status = _run_case(client, run_id, case, fail=case % 6 == 5)
            outcomes.append({"run_id": run_id, "workflow": "triage", "status": status,
                             "ts": f"2026-11-30T10:{case:02d}:00Z"})
            if status == "failure":  # a retry is a new run of the same case
                retry = f"case-{case}-retry"
                outcomes.append({"run_id": retry, "workflow": "triage",
                                 "status": _run_case(client, retry, case, fail=False)})
        late = outcomes[:5]  # the first five outcomes arrive after everything else
        for o in [*outcomes[5:], *late]:
            r = httpx.post(gw.base_url + "/outcomes", json=o, headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 201, r.text
        successes = sum(o["status"] == "success" for o in outcomes)
        runs = {o["run_id"] for o in outcomes}
        assert len(runs) == 23 and successes == 17  # 3 failed runs retried; 3 escalated
        rows = gw.events(expect=23 * 2 + 3)  # a failing step is tried twice by margin's retry
        ledger = [r for r in rows if r["workflow"] == "triage"]
        assert {r["run_id"] for r in ledger} == runs
        spent = sum((Decimal(r["cost_usd"]) for r in ledger), Decimal(0))
        assert any(r["status"] >= 500 for r in ledger) and spent > 0
        assert sum(r["tool_calls"] for r in ledger) == 23  # one tool call planned per run

        report = subprocess.run(
            [sys.executable, "-m", "margin.cli.main", "report", "outcomes", "--config", str(gw.config),
             "--since", "1d", "--json", "--warehouse", ":memory:"], capture_output=True, text=True, timeout=120)
        assert report.returncode == 0, report.stderr
        row = next(w for w in json.loads(report.stdout)["workflows"] if w["workflow"] == "triage")
        assert row["successes"] == successes and row["runs"] == 23
        assert Decimal(row["spend_usd"]) == spent
        assert Decimal(row["cost_per_outcome_usd"]) == spent / successes  # exact, failed and retried runs included
        assert row["calls_per_outcome"] == round(len(ledger) / successes, 2)  # the agentic multiplier
        assert Decimal(row["saving_usd"]) == Decimal("2.00") * successes - spent
    finally:
        assert gw.proc is not None
        stop(gw.proc)
