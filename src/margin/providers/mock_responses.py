"""The mock upstream's `/v1/responses` (OpenAI Responses API): the same deterministic answers as
its chat endpoint, in the Responses shapes. Streams are named events (`event:` + `data:`), one
`response.output_text.delta` per token, ending with `response.completed` (or
`response.incomplete` when `max_output_tokens` cut the answer) that carries the usage; there is
no `[DONE]`."""

from __future__ import annotations

import time
from typing import Any

import orjson

_STATUS = {"stop": "completed", "length": "incomplete"}


def usage(chat_usage: dict[str, Any] | None) -> dict[str, Any] | None:
    """mock_text.usage's counts under the Responses API's names."""
    if chat_usage is None:
        return None
    return {
        "input_tokens": chat_usage["prompt_tokens"],
        "input_tokens_details": {"cached_tokens": chat_usage["prompt_tokens_details"]["cached_tokens"]},
        "output_tokens": chat_usage["completion_tokens"],
        "output_tokens_details": {"reasoning_tokens": chat_usage["completion_tokens_details"]["reasoning_tokens"]},
        "total_tokens": chat_usage["total_tokens"],
    }


def _message(rid: str, tokens: list[str], done: bool, logprob: float | None = None) -> dict[str, Any]:
    part: dict[str, Any] = {"type": "output_text", "text": "".join(tokens), "annotations": []}
    if logprob is not None:  # include=message.output_text.logprobs: every token gets the same one
        part["logprobs"] = [{"token": t, "logprob": logprob, "bytes": list(t.encode()), "top_logprobs": []}
                            for t in tokens]
    return {"id": f"msg_{rid}", "type": "message", "role": "assistant",
            "status": "completed" if done else "in_progress", "content": [part] if done else []}


def _function_calls(rid: str, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"id": f"fc_{rid}_{i}", "type": "function_call", "status": "completed", "call_id": c["id"],
             "name": c["function"]["name"], "arguments": c["function"]["arguments"]} for i, c in enumerate(calls)]


def _response(rid: str, model: str, output: list[dict[str, Any]], status: str,
              use: dict[str, Any] | None) -> dict[str, Any]:
    return {"id": rid, "object": "response", "created_at": int(time.time()), "status": status, "model": model,
            "output": output, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "usage": use}


def body(rid: str, model: str, tokens: list[str], finish: str, chat_usage: dict[str, Any] | None,
         calls: list[dict[str, Any]] | None = None, logprob: float | None = None) -> bytes:
    output = _function_calls(rid, calls) if calls else [_message(rid, tokens, True, logprob)]
    return orjson.dumps(_response(rid, model, output, _STATUS.get(finish, "completed"), usage(chat_usage)))


def _event(seq: int, kind: str, **fields: Any) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps({"type": kind, "sequence_number": seq,
                                                                     **fields}) + b"\n\n"


def events(rid: str, model: str, tokens: list[str], finish: str, chat_usage: dict[str, Any] | None,
           calls: list[dict[str, Any]] | None = None) -> tuple[list[bytes], bytes]:
    """(the events up to the last delta, the closing events): a reset cuts the first list."""
    opening = _response(rid, model, [], "in_progress", None)
    out = [_event(0, "response.created", response=opening), _event(1, "response.in_progress", response=opening)]
    seq = 2
    if calls:
        items = _function_calls(rid, calls)
        for i, item in enumerate(items):
            out.append(_event(seq, "response.output_item.added", output_index=i, item={**item, "arguments": ""}))
            out.append(_event(seq + 1, "response.function_call_arguments.delta", output_index=i,
                              item_id=item["id"], delta=item["arguments"]))
            seq += 2
        tail = [_event(seq + i, "response.output_item.done", output_index=i, item=item) for i, item in enumerate(items)]
        seq += len(items)
        output = items
    else:
        item = _message(rid, [], False)
        out.append(_event(seq, "response.output_item.added", output_index=0, item=item))
        seq += 1
        for t in tokens:
            out.append(_event(seq, "response.output_text.delta", output_index=0, content_index=0,
                              item_id=item["id"], delta=t))
            seq += 1
        done = _message(rid, tokens, True)
        tail = [_event(seq, "response.output_text.done", output_index=0, content_index=0, item_id=item["id"],
                       text="".join(tokens)),
                _event(seq + 1, "response.output_item.done", output_index=0, item=done)]
        seq += 2
        output = [done]
    status = _STATUS.get(finish, "completed")
    final = _response(rid, model, output, status, usage(chat_usage))
    tail.append(_event(seq, f"response.{status}", response=final))
    return out, b"".join(tail)
