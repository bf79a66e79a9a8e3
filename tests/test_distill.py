"""Distillation (issue 11): `margin distill export` writes OpenAI chat fine-tuning JSONL of a workflow's
teacher answers, redacted and deduplicated; `margin distill plan` prices a student against the metered
teacher and hands the migration check a trace. Real gateway, mock upstream, SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import subprocess
import time
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from margin.analytics.distill import build, to_example
from margin.gateway.payloads import redact, redact_obj
from margin.ledger import open_store
from margin.planner.distill import FineTune, Student, Traffic, plan
from tests.conftest import PY, Gateway, read_events

SECRETS = ("ana.lopez@example.com", "+44 20 7946 0958", "4111 1111 1111 1111", "sk-live" + "Z" * 24)
ROLES = {"system", "user", "assistant", "tool"}


# -- redaction kinds added for the export (test_security.py style) ------------------------------------------

@pytest.mark.parametrize(("secret", "kind"), [
    ("4111 1111 1111 1111", "card_number"),
    ("5500-0000-0000-0004", "card_number"),
    ("378282246310005", "card_number"),
    ("+44 20 7946 0958", "phone"),
    ("+1 (415) 555-0100", "phone"),
    ("(415) 555-0100", "phone"),
    ("415-555-0100", "phone"),
    ("+33612345678", "phone"),
])
def test_cards_and_phones_are_redacted(secret: str, kind: str) -> None:
    out = redact(f"before {secret} after")
    assert secret not in out and f"[REDACTED:{kind}]" in out
    assert out.startswith("before ") and out.endswith(" after")


@pytest.mark.parametrize("text", [
    "order 1234567812345678 shipped",          # 16 digits failing the Luhn check: not a card
    "She sold 48 clips in April and 1234567 in May: 3.14159",
    "on 2024-01-15 at 12:30, build 10.0.19045.2965, ISBN 978-3-16-148410-0, ip 192.168.100.200",
    "compute 123-456 + 7890 and x+1 = y+2",
])
def test_numbers_that_are_not_cards_or_phones_survive(text: str) -> None:
    assert redact(text) == text


# -- the dataset, pure -----------------------------------------------------------------------------------

def test_examples_keep_openai_roles_tool_turns_and_tools() -> None:
    req = {"messages": [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "weather in"}, {"type": "text", "text": "Paris?"}]},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function",
                                                                "function": {"name": "w", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"}],
        "tools": [{"type": "function", "function": {"name": "w", "parameters": {}}}]}
    ex, why = to_example(req, "It is sunny.")
    assert why == "" and ex is not None
    assert [m["role"] for m in ex["messages"]] == ["system", "user", "assistant", "tool", "assistant"]
    assert ex["messages"][1]["content"] == "weather in\nParis?" and ex["messages"][3]["tool_call_id"] == "c1"
    assert ex["tools"] == req["tools"] and ex["messages"][-1] == {"role": "assistant", "content": "It is sunny."}
    image = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}
    assert to_example(image, "a cat") == (None, "non_text_content")
    assert to_example({"messages": [{"role": "function", "content": "x"}]}, "y") == (None, "unsupported_role")
    assert to_example({"messages": [{"role": "user", "content": "q"}], "n": 3}, "y") == (None, "several_choices")
    assert to_example({"messages": [{"role": "user", "content": "q"}]}, "  ") == (None, "empty_answer")
    assert to_example({"prompt": "legacy"}, "y") == (None, "no_messages")
    # a Responses API request is the chat request it amounts to
    resp = {"instructions": "be brief", "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "weather in Paris?"}]},
        {"type": "function_call", "call_id": "c1", "name": "w", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"}],
        "tools": [{"type": "function", "name": "w", "parameters": {}}]}
    ex, why = to_example(resp, "It is sunny.")
    assert why == "" and ex is not None and ex["tools"] == req["tools"]
    assert [m["role"] for m in ex["messages"]] == ["system", "user", "assistant", "tool", "assistant"]
    assert ex["messages"][2]["tool_calls"][0]["id"] == "c1" and ex["messages"][3]["tool_call_id"] == "c1"
    assert to_example({"input": "q", "previous_response_id": "resp_1"}, "y") == (None, "input_chat_cannot_carry")


def test_build_filters_and_deduplicates() -> None:
    def ev(i: int, **kw: Any) -> dict[str, Any]:
        return {"event_id": f"e{i}", "workflow": "w", "model": "big", "status": 200, "endpoint": "chat",
                "cost_usd": "0.01", "input_tokens": 10, "output_tokens": 5, "run_id": f"r{i}", **kw}

    rows = [ev(1), ev(2), ev(3, model="small", cost_usd="0.001"), ev(4, status=502), ev(5, tool_calls=1),
            ev(6, tags='{"shadow": "migration"}'), ev(7, actions='[{"action": "cascade_escalate"}]'), ev(8),
            ev(9, workflow="other"), ev(10)]
    q = {"messages": [{"role": "user", "content": "q"}]}
    payloads = {f"e{i}": {"request": q if i != 10 else {"messages": [{"role": "user", "content": "q2"}]},
                          "response": {"text": f"a{i}"}} for i in range(1, 11) if i != 8}
    ds = build(rows, payloads, "w", redact_obj)
    assert ds.teacher == "big" and ds.workflow_calls == 9 and len(ds.examples) == 2
    assert ds.summary()["skipped"] == {"answer_is_tool_call": 1, "duplicate_prompt": 1, "failed_call": 1,
                                       "not_logged": 1, "other_model": 1, "rejected_by_verifier": 1,
                                       "shadow_traffic": 1}
    assert ds.examples[0]["messages"][-1]["content"] == "a1"  # the first answer to a repeated prompt is kept
    outcomes = [{"run_id": "r1", "status": "failure", "ts": "2026-01-01T00:00:00+00:00"},
                {"run_id": "r1", "status": "success", "ts": "2026-01-01T00:01:00+00:00"},
                {"run_id": "r10", "status": "escalated", "ts": "2026-01-01T00:00:00+00:00"}]
    ds = build(rows, payloads, "w", redact_obj, outcomes=outcomes)
    assert [e["messages"][-1]["content"] for e in ds.examples] == ["a1"]
    assert ds.skipped["run_not_successful"] == 1 and ds.skipped["run_without_outcome"] >= 1


# -- the economics, pure ---------------------------------------------------------------------------------------

def _traffic(calls_per_day: float, usd_per_call: str, days: float = 30.0) -> Traffic:
    n = round(calls_per_day * days)
    return Traffic("big", n, days, Decimal(usd_per_call) * n, (1000,) * n, (200,) * n, 0,
                   Decimal(usd_per_call) * n * Decimal("0.6"), Decimal(usd_per_call) * n * Decimal("0.4"), (1,) * 24)


def test_plan_saving_break_even_and_alternatives() -> None:
    s = Student("llama-3.1-8b", "l4", "int4")
    small = plan(_traffic(100, "0.01"), s, FineTune(Decimal("500")), 10_000)
    assert small["teacher"]["monthly_usd"] == "30.00" and small["student"]["monthly_usd"] == "576.00"  # 1 L4 x 720 h
    assert small["monthly_saving_usd"] == "-546.00" and small["break_even_months"] is None
    assert small["verdict"].startswith("keep the teacher") and small["break_even_volume"]["cheaper_above"] == "student"
    be = small["break_even_volume"]["calls_per_day"]
    assert 1800 < be < 2000  # $576 a month at $0.01 a call is 1,920 calls a day (one replica still suffices)
    big = plan(_traffic(20_000, "0.01"), s, FineTune(Decimal("500")), 10_000)
    saving = Decimal(big["monthly_saving_usd"])
    assert saving > 0 and big["student"]["replicas"] >= 1
    assert big["break_even_months"] == pytest.approx(float(Decimal(500) / saving), abs=0.01)
    assert {a["precision"] for a in big["alternatives"]} == {"bf16", "fp8", "int8"}
    est = plan(_traffic(100, "0.01"), s, FineTune(), 50_000_000)["fine_tune"]
    assert "estimate: LoRA" in est["source"] and est["gpu_hours"] >= 1 and Decimal(est["usd"]) > 0


# -- through a running gateway ---------------------------------------------------------------------------------

CHAT = "/chat/completions"


def _post(gw: Gateway, key: str, body: dict[str, Any], **headers: str) -> httpx.Response:
    return httpx.post(gw.base_url + CHAT, json=body, timeout=30, headers={"Authorization": f"Bearer {key}", **headers})


def _payload_count(url: str) -> int:
    async def count() -> int:
        store = open_store(url)
        await store.open()
        try:
            return len(await store.fetch_payloads(since=datetime(2000, 1, 1, tzinfo=UTC)))
        finally:
            await store.close()

    return asyncio.run(count())


@pytest.fixture(scope="module")
def traffic(gateway: Gateway) -> dict[str, Any]:
    logged = gateway.create_key(team="dist", tags={"log_payloads": "true", "workflow": "triage"})["key"]
    quiet = gateway.create_key(team="dist", tags={"workflow": "triage"})["key"]
    pii = (f"Customer {SECRETS[0]} called from {SECRETS[1]}, card {SECRETS[2]}; our key {SECRETS[3]}. "
           "Summarise the ticket.")
    system = {"role": "system", "content": "You triage support tickets."}
    sent: list[httpx.Response] = []

    def chat(key: str, model: str, messages: list[dict[str, Any]], run: str, **extra: Any) -> None:
        headers = extra.pop("headers", {})
        r = _post(gateway, key, {"model": model, "messages": messages, "max_tokens": 16, **extra},
                  **{"X-Margin-Run-Id": run, **headers})
        sent.append(r)

    chat(logged, "gpt-4o", [system, {"role": "user", "content": pii}], "case-1")
    chat(logged, "gpt-4o", [system, {"role": "user", "content": pii}], "case-1")  # a repeat
    chat(logged, "gpt-4o", [system, {"role": "user", "content": [{"type": "text", "text": "Ticket 2: refund"}]},
                            {"role": "assistant", "content": "Which order?"},
                            {"role": "user", "content": "Order 77, call me on 415-555-0100"}], "case-2")
    chat(logged, "gpt-4o", [{"role": "user", "content": "Ticket 3: stream me"}], "case-1", stream=True)
    chat(logged, "gpt-4o", [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "data:image/png;base64,AAAA"}}]}], "case-3")
    chat(logged, "gpt-4o-mini", [{"role": "user", "content": "Ticket 4: cheap"}], "case-3")
    chat(logged, "gpt-4o", [{"role": "user", "content": "Ticket 5: fails"}], "case-3",
         headers={"X-Mock-Status": "500"})
    chat(quiet, "gpt-4o", [{"role": "user", "content": "Ticket 6: not logged"}], "case-3")
    chat(logged, "gpt-4o", [{"role": "user", "content": "Other workflow"}], "case-9",
         headers={"X-Margin-Workflow": "billing"})
    assert [r.status_code for r in sent] == [200, 200, 200, 200, 200, 200, 502, 200, 200], [r.text for r in sent]
    for run, status in (("case-1", "success"), ("case-2", "failure")):
        r = httpx.post(gateway.base_url + "/outcomes", json={"run_id": run, "workflow": "triage", "status": status},
                       headers={"Authorization": f"Bearer {logged}"})
        assert r.status_code in (200, 201), r.text
    deadline = time.monotonic() + 15
    while _payload_count(gateway.ledger_url) < 7 and time.monotonic() < deadline:
        time.sleep(0.1)
    events = gateway.events(expect=len(sent) + 2)
    return {"events": events, "logged": logged}


def _cli(gw: Gateway, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, "-m", "margin.cli.main", "distill", *args, "--config", str(gw.config)],
                          capture_output=True, text=True, timeout=120)


def test_export_is_openai_chat_fine_tuning_jsonl_redacted(gateway: Gateway, traffic: dict[str, Any],
                                                          tmp_path: Path) -> None:
    out = tmp_path / "triage.jsonl"
    r = _cli(gateway, "export", "--workflow", "triage", "--since", "1h", "--out", str(out), "--json")
    assert r.returncode == 0, r.stderr
    summary = orjson.loads(r.stdout)
    lines = out.read_bytes().splitlines()
    assert summary["teacher"] == "gpt-4o" and summary["rows"] == len(lines) == 3
    for raw in lines:  # OpenAI's format: one JSON object per line, a list of role/content messages
        ex = orjson.loads(raw)
        assert isinstance(ex, dict) and set(ex) <= {"messages", "tools"}
        msgs = ex["messages"]
        assert isinstance(msgs, list) and len(msgs) >= 2
        for m in msgs:
            assert m["role"] in ROLES and isinstance(m["content"], str) and set(m) <= {"role", "content", "name"}
        assert msgs[-1]["role"] == "assistant" and msgs[-1]["content"].strip()
        assert any(m["role"] == "user" for m in msgs[:-1])
    text = out.read_text()
    for secret in (*SECRETS, "415-555-0100"):
        assert secret not in text
    for kind in ("email", "phone", "card_number", "api_key"):
        assert f"[REDACTED:{kind}]" in text
    assert "You triage support tickets." in text and "Ticket 3: stream me" in text and "Which order?" in text
    skipped = summary["skipped"]
    assert skipped["duplicate_prompt"] == 1 and skipped["non_text_content"] == 1 and skipped["other_model"] == 1
    assert skipped["not_logged"] == 1 and skipped["failed_call"] >= 1 and "billing" not in text
    teacher = [e for e in traffic["events"] if e["workflow"] == "triage" and e["model"] == "gpt-4o"
               and e["status"] == 200]
    assert summary["input_tokens"] > 0 and summary["tokens"] == summary["input_tokens"] + summary["output_tokens"]
    assert summary["input_tokens"] < sum(int(e["input_tokens"]) for e in teacher)


def test_export_successful_runs_and_validation_split(gateway: Gateway, traffic: dict[str, Any],
                                                     tmp_path: Path) -> None:
    out, valid = tmp_path / "t.jsonl", tmp_path / "v.jsonl"
    r = _cli(gateway, "export", "-w", "triage", "--since", "1h", "--out", str(out), "--successful-runs", "--json")
    assert r.returncode == 0, r.stderr
    summary = orjson.loads(r.stdout)
    assert summary["rows"] == 2 and summary["skipped"]["run_not_successful"] == 1  # case-2 failed
    r = _cli(gateway, "export", "-w", "triage", "--since", "1h", "--out", str(out), "--validation-out", str(valid),
             "--validation-share", "0.5", "--json")
    assert r.returncode == 0, r.stderr
    s = orjson.loads(r.stdout)
    train, val = out.read_bytes().splitlines(), valid.read_bytes().splitlines()
    assert s["train_rows"] == len(train) and s["validation_rows"] == len(val) and len(train) + len(val) == 3
    assert not set(train) & set(val)


def test_export_refuses_what_it_cannot_do(gateway: Gateway, traffic: dict[str, Any], tmp_path: Path) -> None:
    out = str(tmp_path / "x.jsonl")
    r = _cli(gateway, "export", "-w", "nope", "--out", out)
    assert r.returncode == 1 and "no calls of workflow 'nope'" in r.stderr and "triage" in r.stderr
    r = _cli(gateway, "export", "-w", "triage", "--out", out, "--since", "yesterday")
    assert r.returncode == 2 and "--since 'yesterday'" in r.stderr
    r = _cli(gateway, "export", "-w", "triage", "--out", out, "--model", "o3-mini")
    assert r.returncode == 1 and "'o3-mini' answered no call" in r.stderr
    r = _cli(gateway, "export", "-w", "billing", "--out", out, "--model", "gpt-4o", "--successful-runs")
    assert r.returncode == 1 and "no examples" in r.stderr and "run_without_outcome" in r.stderr


def test_plan_prices_the_student_against_the_metered_teacher(gateway: Gateway, traffic: dict[str, Any],
                                                            tmp_path: Path) -> None:
    trace = tmp_path / "triage.trace.jsonl"
    r = _cli(gateway, "plan", "-w", "triage", "--since", "1h", "--student", "llama-3.1-8b", "--gpu", "l4",
             "--precision", "int4", "--fine-tune-usd", "250", "--trace-out", str(trace), "--candidate", "gpt-4o-mini",
             "--json")
    assert r.returncode == 0, r.stderr
    p = orjson.loads(r.stdout)
    teacher = [e for e in read_events(gateway.ledger_url) if e["workflow"] == "triage" and e["model"] == "gpt-4o"
               and e["status"] == 200]
    assert p["teacher"]["model"] == "gpt-4o" and p["teacher"]["calls"] == len(teacher)
    assert Decimal(p["teacher"]["metered_usd"]) == sum(Decimal(str(e["cost_usd"])) for e in teacher)
    assert p["student"]["gpu"] == "l4" and p["student"]["precision"] == "int4" and p["student"]["replicas"] >= 1
    assert p["fine_tune"]["usd"] == "250.00" and Decimal(p["monthly_saving_usd"]) < 0  # a few calls: keep the teacher
    replay = p["validation"]["steps"][-2]
    assert replay.startswith(f"margin replay {trace} --policy margin.yaml --candidate gpt-4o-mini --replace gpt-4o")
    # the validation step runs: the migration check replays the workflow's trace through the gateway
    cmd = [PY, "-m", "margin.cli.main", "replay", str(trace), "--policy", str(gateway.config), "--candidate",
           "gpt-4o-mini", "--replace", "gpt-4o", "--gateway", gateway.base_url, "--key", traffic["logged"],
           "--scorer", "exact", "--sample", "3", "--json"]
    m = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert m.returncode == 0, m.stderr
    shadow = orjson.loads(m.stdout)["shadow"]
    assert shadow["sampled"] == 3 and shadow["answered"] == 3
    r = _cli(gateway, "plan", "-w", "triage", "--since", "1h")
    assert r.returncode == 0 and "teacher against student" in r.stdout and "margin replay" in r.stdout, r.stderr


def test_plan_refuses_bad_input(gateway: Gateway, traffic: dict[str, Any]) -> None:
    r = _cli(gateway, "plan", "-w", "triage", "--since", "1h", "--gpu", "tpu9")
    assert r.returncode == 2 and "tpu9" in r.stderr
    r = _cli(gateway, "plan", "-w", "triage", "--since", "1h", "--student", "llama-3.1-70b", "--gpu", "l4",
             "--precision", "bf16")
    assert r.returncode == 2 and "GB of weights" in r.stderr
    r = _cli(gateway, "plan", "-w", "triage", "--since", "1h", "--fine-tune-usd", "lots")
    assert r.returncode == 2 and "--fine-tune-usd 'lots'" in r.stderr
    r = _cli(gateway, "plan", "-w", "triage", "--since", "1h", "--model", "o3-mini")
    assert r.returncode == 1 and "o3-mini" in r.stderr


@pytest.mark.parametrize(("calls_per_day", "teacher", "student", "replicas", "saving", "fine_tune"), [
    (2_000, "330.00", "576.00", 1, "-246.00", "28.00"),
    (20_000, "3300.00", "576.00", 1, "2724.00", "272.00"),
    (200_000, "33000.00", "1728.00", 3, "31272.00", "2692.00"),
])
def test_the_worked_example_of_docs_distillation(calls_per_day: int, teacher: str, student: str, replicas: int,
                                                 saving: str, fine_tune: str) -> None:
    n = calls_per_day * 30
    t = Traffic("gpt-4o", n, 30.0, Decimal("0.0055") * n, (1200,) * n, (250,) * n, 0, Decimal("0.0055") * n
                * Decimal("0.55"), Decimal("0.0055") * n * Decimal("0.45"), (1,) * 24)
    r = plan(t, Student("llama-3.1-8b", "l4", "int4"), FineTune(), n * 1450)
    assert (r["teacher"]["monthly_usd"], r["student"]["monthly_usd"], r["student"]["replicas"],
            r["monthly_saving_usd"], r["fine_tune"]["usd"]) == (teacher, student, replicas, saving, fine_tune)
    assert 3400 < r["break_even_volume"]["calls_per_day"] < 3600
