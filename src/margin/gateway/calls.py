"""What the pipeline needs to know about a call's payload and an upstream's failure: token
estimates, required capabilities, the mapping of upstream errors to client errors, and the event a
call leaves if the process dies during it."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from typing import Any

import orjson

from margin.domain import Endpoint, Event, Usage
from margin.gateway.errors import UpstreamFailed
from margin.pricing import PriceBook
from margin.pricing.tokens import count_messages, count_prompt, count_text
from margin.providers.base import UpstreamConnectionError, UpstreamError, UpstreamTimeout


def upstream_error(e: Exception) -> UpstreamFailed:
    if isinstance(e, UpstreamTimeout):
        return UpstreamFailed(f"Upstream timeout: {e}", status=504, code="upstream_timeout").transient(True)
    if isinstance(e, UpstreamConnectionError):
        return UpstreamFailed(f"Upstream connection failed: {e}", code="upstream_connection_error").transient(True)
    assert isinstance(e, UpstreamError)
    if e.status == 429:
        err = UpstreamFailed(f"Upstream rate limit: {e.message}", status=429, code="upstream_rate_limited")
        err.type = "rate_limit_error"
        err.retryable, err.retry_after_s = True, e.retry_after_s
        return err
    if 400 <= e.status < 500 and e.status not in (401, 403, 407):
        # The provider judged the request itself (context too long, bad parameter): pass it on.
        err = UpstreamFailed(f"Upstream rejected the request: {e.message}", status=e.status,
                             code=e.error_type or "upstream_rejected")
        err.type = "invalid_request_error"
        return err
    # Anything else is the provider's failure, not the client's: a bad gateway.
    code = e.error_type if e.error_type == "invalid_upstream_response" else "upstream_error"
    err = UpstreamFailed(f"Upstream error (HTTP {e.status}): {e.message}", code=code).transient(True)
    err.retry_after_s = e.retry_after_s
    return err


def needed_capabilities(payload: dict[str, Any]) -> frozenset[str]:
    need = set()
    if payload.get("tools") or payload.get("functions"):
        need.add("tools")
    rf = payload.get("response_format")
    if isinstance(rf, dict) and rf.get("type") in ("json_object", "json_schema"):
        need.add("json")
    for m in payload.get("messages") or ():
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list) and any(isinstance(p, dict) and p.get("type") == "image_url" for p in content):
            need.add("vision")
    return frozenset(need)


def estimate_input(endpoint: Endpoint, payload: dict[str, Any]) -> int:
    if endpoint == "chat":
        tools = payload.get("tools")  # tool definitions are prompt tokens too
        return count_messages(payload.get("messages")) + (count_text(orjson.dumps(tools).decode()) if tools else 0)
    return count_prompt(payload.get("prompt") if endpoint == "completion" else payload.get("input"))


def output_text(data: dict[str, Any]) -> str:
    parts = []
    for c in data.get("choices") or ():
        if isinstance(c, dict):
            msg = c.get("message") or c.get("delta") or {}
            parts.append(str(c.get("text") or (msg.get("content") if isinstance(msg, dict) else "") or ""))
    return "".join(parts)


def tool_calls_in(data: dict[str, Any]) -> int:
    """Tool calls a (non-streamed) answer asks the client to run: what run caps count."""
    n = 0
    for c in data.get("choices") or ():
        msg = c.get("message") if isinstance(c, dict) else None
        if isinstance(msg, dict):
            n += len(msg.get("tool_calls") or ()) + (1 if msg.get("function_call") else 0)
    return n


def prompt_text(endpoint: Endpoint, payload: dict[str, Any]) -> str:
    """What a learned router reads: the last user turn of a chat, or the prompt."""
    if endpoint == "chat":
        for m in reversed(payload.get("messages") or ()):
            if isinstance(m, dict) and m.get("role") == "user":
                c = m.get("content")
                if isinstance(c, list):
                    return " ".join(p.get("text", "") for p in c if isinstance(p, dict))
                return str(c or "")
        return ""
    p = payload.get("prompt") if endpoint == "completion" else payload.get("input")
    return p if isinstance(p, str) else " ".join(x for x in p or () if isinstance(x, str))


def lost_call(ev: Event, endpoint: Endpoint, model: str, payload: dict[str, Any], prices: PriceBook) -> Event:
    """What the ledger keeps if the process dies during the call: the provider may bill it, so it
    must not vanish (ledger/writer.py journals it and replays it only after such a death)."""
    usage = Usage(input_tokens=estimate_input(endpoint, payload), source="estimated")
    return dataclasses.replace(ev, status=500, error_type="replica_lost", usage=usage,
                               cost=prices.cost(model, usage), ts_end=datetime.now(UTC),
                               actions=[*ev.actions, {"action": "replica_lost", "note": "the gateway process "
                                        "ended during the call; input cost estimated, output unknown"}])
