"""The OpenAI Responses API's wire shapes, read the way margin reads a chat: the request's
`instructions` + `input` items as chat messages (for token estimates, routing text, loop hashes,
pool affinity), and an answer's output items, whole or streamed, as text and tool calls.

Pure functions on parsed JSON; unknown item and event types are skipped, never an error, because
the API keeps adding them (web search, reasoning, computer use) and margin only meters them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# A streamed response ends with one of these; there is no `data: [DONE]` sentinel. An `error`
# event ends it too (nothing follows it).
TERMINAL_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed"})
ENDING_EVENTS = TERMINAL_EVENTS | {"error"}
MIN_OUTPUT_TOKENS = 16  # OpenAI refuses a max_output_tokens below this
# Events that carry a piece of the answer (text, refusal, reasoning, a function call's arguments).
_DELTA_EVENTS = frozenset({"response.output_text.delta", "response.refusal.delta",
                           "response.reasoning_text.delta", "response.reasoning_summary_text.delta",
                           "response.function_call_arguments.delta", "response.custom_tool_call_input.delta"})
_TEXT_PARTS = frozenset({"input_text", "output_text", "text", "refusal"})
# Output items the client runs (an agent step each); web search, MCP and the like run at the provider.
CLIENT_CALLS = frozenset({"function_call", "custom_tool_call", "computer_call", "local_shell_call"})


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(p.get("text") or "") for p in content
                        if isinstance(p, dict) and p.get("type") in _TEXT_PARTS)
    return ""


def input_items(payload: Mapping[str, Any]) -> list[Any]:
    """A Responses call's `input` as a list of items: a string input is one user message."""
    items = payload.get("input")
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    return items if isinstance(items, list) else []


def turns(endpoint: str, payload: Mapping[str, Any]) -> list[Any]:
    """A chat's messages or a Responses call's input items, as sent ([] for other endpoints)."""
    if endpoint == "chat":
        messages = payload.get("messages")
        return messages if isinstance(messages, list) else []
    return input_items(payload) if endpoint == "response" else []


def as_messages(payload: Mapping[str, Any]) -> list[dict[str, Any]]:
    """`instructions` and `input` as chat messages: a string input is one user turn; message items
    keep their role; a function call is an assistant turn, its output a tool turn."""
    out: list[dict[str, Any]] = []
    if isinstance(payload.get("instructions"), str) and payload["instructions"]:
        out.append({"role": "developer", "content": payload["instructions"]})
    for item in input_items(payload):
        if not isinstance(item, dict):
            continue
        kind = item.get("type", "message")
        if kind == "message" and isinstance(item.get("role"), str):
            out.append({"role": item["role"], "content": _text(item.get("content"))})
        elif kind == "function_call":
            out.append({"role": "assistant", "content": f"{item.get('name') or ''}({item.get('arguments') or ''})"})
        elif kind == "function_call_output":
            out.append({"role": "tool", "content": _text(item.get("output"))})
    return out


def output_text(data: dict[str, Any]) -> str:
    """A whole response's answer: message text and refusals, and function calls as name + arguments."""
    parts: list[str] = []
    for item in data.get("output") or ():
        if not isinstance(item, dict):
            continue
        if item.get("type") == "message":
            parts.append(_text(item.get("content")))
        elif item.get("type") == "function_call":
            parts.append(str(item.get("name") or "") + str(item.get("arguments") or ""))
    return "".join(parts)


def tool_calls(data: dict[str, Any]) -> int:
    """Tool calls a whole response asks the client to run (what run caps count)."""
    return sum(1 for item in data.get("output") or () if isinstance(item, dict) and item.get("type") in CLIENT_CALLS)


def is_event(data: dict[str, Any]) -> bool:
    t = data.get("type")
    return isinstance(t, str) and (t.startswith("response.") or t == "error")


def event_text(data: dict[str, Any]) -> str:
    """The piece of the answer a stream event carries ("" for lifecycle events)."""
    if data.get("type") in _DELTA_EVENTS and isinstance(data.get("delta"), str):
        return str(data["delta"])
    if event_tool_call(data):
        return str(data["item"].get("name") or "")
    return ""


def event_tool_call(data: dict[str, Any]) -> bool:
    """True for the event that opens a call the client runs (one per call)."""
    item = data.get("item")
    return (data.get("type") == "response.output_item.added" and isinstance(item, dict)
            and item.get("type") in CLIENT_CALLS)


def event_response(data: dict[str, Any]) -> dict[str, Any] | None:
    """The response object a lifecycle event carries (its `usage` once it has ended)."""
    r = data.get("response")
    return r if isinstance(r, dict) else None


def event_failed(data: dict[str, Any]) -> bool:
    return data.get("type") in ("response.failed", "error")
