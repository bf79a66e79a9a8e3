"""What the pipeline needs to know about a call's payload and an upstream's failure: token
estimates, required capabilities, the mapping of upstream errors to client errors, and the event a
call leaves if the process dies during it."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from typing import Any

import orjson

from margin.config import RetryConfig
from margin.domain import Endpoint, Event, RouteDecision, Usage, responses
from margin.gateway.errors import UpstreamFailed
from margin.gateway.stream import Relayed
from margin.policy.route import RESPONSES_STATE
from margin.pricing import PriceBook
from margin.pricing.tokens import count_messages, count_prompt, count_text
from margin.providers.base import UpstreamConnectionError, UpstreamError, UpstreamTimeout
from margin.providers.usage import parse_usage


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
    if payload.get("previous_response_id") or payload.get("conversation") or any(
            isinstance(t, dict) and t.get("type") != "function" for t in payload.get("tools") or ()):
        need.add(RESPONSES_STATE)
    text = payload.get("text")  # the Responses API's response_format
    rf = payload.get("response_format") or (text.get("format") if isinstance(text, dict) else None)
    if isinstance(rf, dict) and rf.get("type") in ("json_object", "json_schema"):
        need.add("json")
    items = payload.get("messages") or payload.get("input")
    for m in items if isinstance(items, list) else ():
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list) and any(isinstance(p, dict) and p.get("type") in ("image_url", "input_image")
                                             for p in content):
            need.add("vision")
    return frozenset(need)


def turns(endpoint: Endpoint, payload: dict[str, Any]) -> int:
    """A chat's messages or a Responses call's input items: each costs some tokens of framing."""
    return len(responses.turns(endpoint, payload))


def estimate_input(endpoint: Endpoint, payload: dict[str, Any]) -> int:
    if endpoint in ("chat", "response"):
        tools = payload.get("tools")  # tool definitions are prompt tokens too
        messages = payload.get("messages") if endpoint == "chat" else responses.as_messages(payload)
        return count_messages(messages) + (count_text(orjson.dumps(tools).decode()) if tools else 0)
    return count_prompt(payload.get("prompt") if endpoint == "completion" else payload.get("input"))


def output_text(data: dict[str, Any]) -> str:
    if data.get("object") == "response":
        return responses.output_text(data)
    parts = []
    for c in data.get("choices") or ():
        if isinstance(c, dict):
            msg = c.get("message") or c.get("delta") or {}
            parts.append(str(c.get("text") or (msg.get("content") if isinstance(msg, dict) else "") or ""))
    return "".join(parts)


def tool_calls_in(data: dict[str, Any]) -> int:
    """Tool calls a (non-streamed) answer asks the client to run: what run caps count."""
    if data.get("object") == "response":
        return responses.tool_calls(data)
    n = 0
    for c in data.get("choices") or ():
        msg = c.get("message") if isinstance(c, dict) else None
        if isinstance(msg, dict):
            n += len(msg.get("tool_calls") or ()) + (1 if msg.get("function_call") else 0)
    return n


def prompt_text(endpoint: Endpoint, payload: dict[str, Any]) -> str:
    """What a learned router reads: the last user turn of a chat, or the prompt."""
    if endpoint in ("chat", "response"):
        messages = payload.get("messages") if endpoint == "chat" else responses.as_messages(payload)
        for m in reversed(messages or ()):
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


def backoff_s(retry: RetryConfig, attempt: int, retry_after_s: float | None) -> float | None:
    """Seconds to wait before retry number `attempt` + 1, or None if the upstream asks for longer
    than we are willing to wait."""
    wait: float = min(retry.max_backoff_ms, retry.backoff_ms * 2**attempt) / 1000
    if retry_after_s is not None:
        if retry_after_s * 1000 > retry.max_backoff_ms:
            return None
        wait = max(wait, retry_after_s)  # honour the upstream's Retry-After
    return wait


def route_headers(ev: Event, decision: RouteDecision) -> list[tuple[bytes, bytes]]:
    h = [(b"x-margin-route", f"{decision.model} via {decision.provider} ({decision.reason})".encode()),
         (b"x-margin-request-id", ev.request_id.encode()), (b"x-margin-event-id", ev.event_id.encode())]
    if decision.downgraded_from:
        h.append((b"x-margin-downgraded-from", decision.downgraded_from.encode()))
    return h


def streamed_usage(endpoint: Endpoint, payload: dict[str, Any], r: Relayed) -> Usage:
    """A stream's usage when the provider sent none. OpenAI-compatible servers usually stream one
    token per chunk; some batch several, which the text count catches."""
    out_tokens = max(r.n_out, count_text("".join(r.pieces)))
    return Usage(input_tokens=estimate_input(endpoint, payload), output_tokens=out_tokens, source="estimated")


def answered_usage(endpoint: Endpoint, payload: dict[str, Any], data: dict[str, Any]) -> Usage:
    """A whole answer's usage: the provider's, else estimated from the prompt and the answer's text."""
    return parse_usage(data) or Usage(input_tokens=estimate_input(endpoint, payload),
                                      output_tokens=count_text(output_text(data)), source="estimated")
