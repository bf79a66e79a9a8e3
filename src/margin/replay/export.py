"""margin's ledger as a trace (`margin export trace`): one JSONL line per client request.

Follow-up attempts (retries, fallbacks, cascade steps: rows with a `parent_event_id`) are the same
request and are left out, as are requests refused before they named a model or for a bad key or
body (4xx other than budget and rate-limit refusals): they are not demand a policy could serve.
Budget-refused requests stay: another policy might serve them. Where payload logging recorded the
request and response (`payloads` rows), their messages and answer text are included.

Cascade first steps carry their recorded verdict (`cascade_escalated`), and the header counts them
per group (`cascade: {group: {steps, escalated}}`): a replay prices escalations at that rate by
default (replay/cascade.py)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

import orjson

CASCADE_STEP_1 = re.compile(r"^group (?P<group>.+?): cascade step 1\b")
KEPT_REFUSALS = frozenset({"budget_exceeded", "budget_deferred", "rate_limit_exceeded", "run_limit_exceeded"})


def keep(row: Mapping[str, Any]) -> bool:
    if row.get("parent_event_id") or not row.get("requested_model"):
        return False
    status = int(row.get("status") or 0)
    return status == 200 or (row.get("error_type") or "") in KEPT_REFUSALS


def _answer(response: Any) -> str | None:
    """The answer text: payload logging stores {"text": ...}; an OpenAI body has choices."""
    if not isinstance(response, dict):
        return None
    if isinstance(response.get("text"), str):
        return str(response["text"])
    for c in response.get("choices") or ():
        if isinstance(c, dict):
            msg = c.get("message") or {}
            text = c.get("text") or (msg.get("content") if isinstance(msg, dict) else None)
            if text:
                return str(text)
    return None


def _actions(row: Mapping[str, Any]) -> list[Any]:
    actions = row.get("actions") or []
    parsed = orjson.loads(actions) if isinstance(actions, str | bytes) else actions
    return parsed if isinstance(parsed, list) else []


def cascade_verdict(row: Mapping[str, Any]) -> tuple[str, bool] | None:
    """(group, escalated) for a cascade's first step that answered, else None."""
    m = CASCADE_STEP_1.match(str(row.get("route_reason") or ""))
    if m is None or row.get("parent_event_id") or int(row.get("status") or 0) != 200 or row.get("cache_hit"):
        return None
    return m["group"], any(isinstance(a, dict) and a.get("action") == "cascade_escalate" for a in _actions(row))


def cascade_counts(rows: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, int]]:
    """Per cascade group: first steps that answered, and how many of them escalated."""
    out: dict[str, dict[str, int]] = {}
    for r in rows:
        v = cascade_verdict(r)
        if v is not None:
            c = out.setdefault(v[0], {"steps": 0, "escalated": 0})
            c["steps"] += 1
            c["escalated"] += int(v[1])
    return out


def trace_lines(rows: Iterable[Mapping[str, Any]], payloads: Mapping[str, Mapping[str, Any]] | None = None,
                start: datetime | None = None, source: str = "") -> Iterable[bytes]:
    """JSONL lines (bytes, newline-terminated): a header, then one request per kept row."""
    rows = list(rows)
    header: dict[str, Any] = {"margin_trace": 1, "source": source}
    if start is not None:
        header["start"] = start.isoformat()
    cascades = cascade_counts(rows)
    if cascades:
        header["cascade"] = cascades
    yield orjson.dumps(header) + b"\n"
    for r in rows:
        if not keep(r):
            continue
        tags = r.get("tags") or {}
        if isinstance(tags, str):
            tags = orjson.loads(tags or "{}")
        line: dict[str, Any] = {
            "ts": r["ts_start"], "input_tokens": int(r.get("input_tokens") or 0),
            "output_tokens": int(r.get("output_tokens") or 0),
            "cached_input_tokens": int(r.get("cached_input_tokens") or 0),
            "requested_model": r.get("requested_model") or "", "model": r.get("model") or "",
            "tags": tags, "status": int(r.get("status") or 0), "cost_usd": r.get("cost_usd"),
            "event_id": r.get("event_id"), "run_id": r.get("run_id") or "",
        }
        for k in ("org", "team", "user", "app", "env", "key_id", "workflow", "tier"):
            if r.get(k):
                line[k] = r[k]
        if r.get("tool_calls"):
            line["tool_calls"] = int(r["tool_calls"])
        verdict = cascade_verdict(r)
        if verdict is not None:
            line["cascade_escalated"] = verdict[1]
        if r.get("cache_hit"):
            line["cache_hit"] = r["cache_hit"]
            hit = next((a for a in _actions(r) if isinstance(a, dict) and a.get("action") == "cache_hit"), {})
            # A hit used no provider tokens; the request it answered had these.
            line["input_tokens"] = int(hit.get("input_tokens") or 0)
            line["output_tokens"] = int(hit.get("output_tokens") or 0)
        p = (payloads or {}).get(str(r.get("event_id")))
        if p:
            req = p.get("request")
            req = orjson.loads(req) if isinstance(req, str | bytes) else req
            if isinstance(req, dict):
                if isinstance(req.get("messages"), list):
                    line["messages"] = req["messages"]
                elif isinstance(req.get("prompt"), str):
                    line["prompt"] = req["prompt"]
                for k in ("max_tokens", "temperature"):
                    if req.get(k) is not None:
                        line[k] = req[k]
            resp = p.get("response")
            answer = _answer(orjson.loads(resp) if isinstance(resp, str | bytes) else resp)
            if answer is not None:
                line["response"] = answer
        yield orjson.dumps(line, default=str) + b"\n"
