"""A distillation dataset from a workflow's recorded traffic (`margin distill export`).

Input: the ledger's events, the `payloads` rows of keys that opted in to payload logging, and
optionally the outcomes of runs. Output: OpenAI chat fine-tuning examples, one per kept call,

    {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": ...}, ...,
                  {"role": "assistant", "content": <the teacher's answer>}], "tools": [...]?}

A call is kept when it belongs to the workflow, was answered by the teacher model (status 200, chat),
was logged, was not a cascade step its verifier rejected nor shadow traffic of a migration check,
its answer is text (not a tool call), and (with `successful_runs`) its run's latest outcome is
`success`. Prompts seen before are dropped (the first answer is kept), so repeated prompts do not
outweigh the rest. Every string is passed through `redact` (the gateway's payload redactor, given by
the caller because analytics may not import the gateway) although payloads were redacted when they
were logged: kinds added since then apply too. Pure: no I/O, no clock."""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import orjson

from margin.providers.base import UpstreamError
from margin.providers.responses_via_chat import to_chat

ROLES = frozenset({"system", "user", "assistant", "tool"})
_CHATS = ("chat", "response")  # endpoints whose calls are conversations a chat model can learn
MIN_EXAMPLES = 10  # OpenAI's fine-tuning API refuses fewer
Redactor = Callable[[Any], Any]
Row = Mapping[str, Any]


def _json(value: Any) -> Any:
    return orjson.loads(value) if isinstance(value, str | bytes) else value


def workflow_of(row: Row) -> str:
    if row.get("workflow"):
        return str(row["workflow"])
    tags = _json(row.get("tags") or {}) or {}
    return str(tags.get("workflow", "")) if isinstance(tags, dict) else ""


def is_shadow(row: Row) -> bool:
    tags = _json(row.get("tags") or {}) or {}
    return isinstance(tags, dict) and tags.get("shadow") == "migration"


def rejected_by_verifier(row: Row) -> bool:
    actions = _json(row.get("actions") or []) or []
    return any(isinstance(a, dict) and a.get("action") == "cascade_escalate" for a in actions)


def teacher_calls(rows: Iterable[Row], workflow: str) -> list[Row]:
    """The workflow's successful chat calls that count as the teacher's work (no shadow traffic, no
    verifier-rejected cascade steps)."""
    return [r for r in rows if workflow_of(r) == workflow and int(r.get("status") or 0) == 200
            and (r.get("endpoint") or "chat") in _CHATS and not is_shadow(r) and not rejected_by_verifier(r)]


def spend_by_model(rows: Iterable[Row]) -> dict[str, Decimal]:
    out: dict[str, Decimal] = {}
    for r in rows:
        m = str(r.get("model") or "")
        out[m] = out.get(m, Decimal(0)) + Decimal(str(r.get("cost_usd") or "0"))
    return out


def pick_teacher(rows: Iterable[Row], model: str | None) -> str | None:
    """`model` if given, else the model the workflow spent most on (ties: the name, for stability)."""
    if model:
        return model
    spend = spend_by_model(rows)
    return max(spend, key=lambda m: (spend[m], m)) if spend else None


def answer_text(response: Any) -> str | None:
    """Payload logging stores {"text": ...}; tolerate an OpenAI response body too."""
    response = _json(response)
    if not isinstance(response, dict):
        return None
    if isinstance(response.get("text"), str):
        return str(response["text"])
    for c in response.get("choices") or ():
        msg = c.get("message") if isinstance(c, dict) else None
        if isinstance(msg, dict) and isinstance(msg.get("content"), str):
            return str(msg["content"])
    return None


def _content(value: Any) -> tuple[str | None, str]:
    """Message content as text; ('', reason) when it is not text-only."""
    if value is None or isinstance(value, str):
        return value, ""
    if isinstance(value, list):
        parts = []
        for p in value:
            if not (isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)):
                return None, "non_text_content"
            parts.append(p["text"])
        return "\n".join(parts), ""
    return None, "bad_content"


def to_example(request: Any, answer: str) -> tuple[dict[str, Any] | None, str]:
    """An OpenAI chat fine-tuning line from a logged request (chat, or Responses API read as the
    chat request it amounts to) and the answer, or (None, why not)."""
    request = _json(request)
    if isinstance(request, dict) and "input" in request and "messages" not in request:
        try:
            request = to_chat("distill", request)
        except UpstreamError:
            return None, "input_chat_cannot_carry"
    messages = request.get("messages") if isinstance(request, dict) else None
    if not isinstance(messages, list) or not messages:
        return None, "no_messages"
    if int(request.get("n") or 1) != 1:
        return None, "several_choices"
    out: list[dict[str, Any]] = []
    for m in messages:
        if not isinstance(m, dict):
            return None, "bad_message"
        role = "system" if m.get("role") == "developer" else m.get("role")
        if role not in ROLES:
            return None, "unsupported_role"
        content, why = _content(m.get("content"))
        if why:
            return None, why
        msg: dict[str, Any] = {"role": role, "content": content}
        if role == "assistant" and m.get("tool_calls"):
            msg["tool_calls"] = m["tool_calls"]
        elif content is None:
            return None, "empty_message"
        if role == "tool":
            msg["tool_call_id"] = m.get("tool_call_id")
        if isinstance(m.get("name"), str) and role in ("system", "user", "assistant"):
            msg["name"] = m["name"]
        out.append(msg)
    if not any(m["role"] == "user" for m in out):
        return None, "no_user_message"
    if not answer.strip():
        return None, "empty_answer"
    line: dict[str, Any] = {"messages": [*out, {"role": "assistant", "content": answer}]}
    tools = request.get("tools")
    if isinstance(tools, list) and tools:
        line["tools"] = tools
    return line, ""


def prompt_key(example: Mapping[str, Any]) -> str:
    body = {"messages": example["messages"][:-1], "tools": example.get("tools")}
    return hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()


def successful_run_ids(outcomes: Iterable[Row]) -> tuple[set[str], set[str]]:
    """(runs whose latest outcome is success, runs with any outcome)."""
    latest: dict[str, tuple[tuple[str, str], str]] = {}  # run -> ((ts, received_at), status)
    for o in outcomes:
        run, key = str(o.get("run_id") or ""), (str(o.get("ts") or ""), str(o.get("received_at") or ""))
        if run and (run not in latest or key >= latest[run][0]):
            latest[run] = (key, str(o.get("status") or ""))
    return {r for r, (_, status) in latest.items() if status == "success"}, set(latest)


@dataclass
class Dataset:
    workflow: str
    teacher: str | None
    examples: list[dict[str, Any]] = field(default_factory=list)
    event_ids: list[str] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)
    models: Counter[str] = field(default_factory=Counter)
    workflow_calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0

    def summary(self) -> dict[str, Any]:
        warnings = []
        if len(self.examples) < MIN_EXAMPLES:
            warnings.append(f"{len(self.examples)} examples: OpenAI fine-tuning needs at least {MIN_EXAMPLES}")
        if self.skipped.get("not_logged"):
            warnings.append(f"{self.skipped['not_logged']} of the teacher's calls were not logged: give the "
                            "workflow's keys the tag log_payloads=true to record them")
        return {"workflow": self.workflow, "teacher": self.teacher, "workflow_calls": self.workflow_calls,
                "calls_by_model": dict(self.models.most_common()), "rows": len(self.examples),
                "input_tokens": self.input_tokens, "output_tokens": self.output_tokens,
                "tokens": self.input_tokens + self.output_tokens,
                "skipped": dict(sorted(self.skipped.items(), key=lambda kv: (-kv[1], kv[0]))),
                "warnings": warnings}


def build(rows: Iterable[Row], payloads: Mapping[str, Mapping[str, Any]], workflow: str, redact: Redactor,
          model: str | None = None, outcomes: Iterable[Row] | None = None) -> Dataset:
    """The dataset of `workflow` from ledger rows (oldest first) and logged payloads by event id.
    `outcomes` given: only calls of runs whose latest outcome is `success`."""
    mine = [r for r in rows if workflow_of(r) == workflow]
    good = teacher_calls(mine, workflow)
    ds = Dataset(workflow, pick_teacher(good, model), workflow_calls=len(mine))
    ds.models.update(str(r.get("model") or "") for r in mine)
    ok_runs, judged = successful_run_ids(outcomes) if outcomes is not None else (set(), set())
    seen: set[str] = set()
    kept = {id(r) for r in good}
    for r in mine:
        reason = ""
        if id(r) not in kept:
            reason = ("shadow_traffic" if is_shadow(r) else "rejected_by_verifier" if rejected_by_verifier(r)
                      else "not_chat" if (r.get("endpoint") or "chat") not in _CHATS else "failed_call")
        elif r.get("model") != ds.teacher:
            reason = "other_model"
        elif outcomes is not None and not r.get("run_id"):
            reason = "no_run_id"
        elif outcomes is not None and r["run_id"] not in ok_runs:
            reason = "run_not_successful" if r["run_id"] in judged else "run_without_outcome"
        elif int(r.get("tool_calls") or 0) > 0:
            reason = "answer_is_tool_call"
        if reason:
            ds.skipped[reason] += 1
            continue
        p = payloads.get(str(r.get("event_id")))
        if p is None:
            ds.skipped["not_logged"] += 1
            continue
        answer = answer_text(p.get("response"))
        example, why = to_example(p.get("request"), answer or "") if answer is not None else (None, "no_answer")
        if example is None:
            ds.skipped[why] += 1
            continue
        example = redact(example)
        key = prompt_key(example)
        if key in seen:
            ds.skipped["duplicate_prompt"] += 1
            continue
        seen.add(key)
        ds.examples.append(example)
        ds.event_ids.append(str(r.get("event_id")))
        ds.input_tokens += int(r.get("input_tokens") or 0)
        ds.output_tokens += int(r.get("output_tokens") or 0)
    return ds


def split(ds: Dataset, share: float) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(training, validation): a stable split by prompt hash, so re-exports put a prompt on the same side."""
    train: list[dict[str, Any]] = []
    valid: list[dict[str, Any]] = []
    for ex in ds.examples:
        (valid if int(prompt_key(ex)[:8], 16) / 0xFFFFFFFF < share else train).append(ex)
    return train, valid


def jsonl(examples: Iterable[Mapping[str, Any]]) -> Iterable[bytes]:
    for ex in examples:
        yield orjson.dumps(ex) + b"\n"
