"""Serve the Responses API (/v1/responses) on an upstream that only speaks chat completions
(llama.cpp, TGI, Triton, and OpenAI-compatible APIs without /responses): the request becomes a
chat request and the answer, whole or streamed, comes back in the Responses shapes. So a client
written against `client.responses.create` can use any model margin serves.

What has no chat equivalent is refused with a 400 naming it, never dropped silently: stored state
(`previous_response_id`, `conversation`), built-in tools (web search, file search, ...), file inputs,
item references. Stream events carry what a client renders and meters (text and function-call
deltas, item boundaries, the final response with usage); per-token logprobs only in whole answers."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import orjson

from margin.domain import Endpoint
from margin.domain.responses import input_items
from margin.providers.base import Chunk, Provider, Reply, UpstreamError
from margin.providers.usage import parse_usage

_COPIED = ("temperature", "top_p", "parallel_tool_calls", "user", "stream")
# Asked for, but chat completions have nothing that does it: refused rather than dropped.
_REFUSED = (("previous_response_id", "'previous_response_id' (stored responses)"),
            ("conversation", "'conversation' (stored responses)"),
            ("background", "'background' (responses run and polled on the provider)"),
            ("prompt", "'prompt' (prompt templates stored on the provider)"),
            ("max_tool_calls", "'max_tool_calls'"))
_TEXT_PARTS = ("input_text", "output_text", "text", "refusal")


class Unsupported(UpstreamError):
    def __init__(self, provider: str, what: str):
        super().__init__(400, f"provider {provider} serves the Responses API through chat completions, which "
                         f"cannot carry {what}", "invalid_request_error")


def _parts(provider: str, content: Any, assistant: bool) -> Any:
    if isinstance(content, str) or content is None:
        return content or ""
    parts: list[dict[str, Any]] = []
    for p in content if isinstance(content, list) else ():
        kind = p.get("type") if isinstance(p, dict) else None
        if kind in _TEXT_PARTS:
            parts.append({"type": "text", "text": str(p.get("text") or p.get("refusal") or "")})
        elif kind == "input_image" and p.get("image_url"):
            parts.append({"type": "image_url", "image_url": {"url": p["image_url"], "detail": p.get("detail", "auto")}})
        else:
            raise Unsupported(provider, f"a '{kind}' content part")
    if all(p["type"] == "text" for p in parts):  # plain text: the form every server reads
        return "".join(p["text"] for p in parts)
    if assistant:
        raise Unsupported(provider, "images in an assistant turn or a tool output")
    return parts


def _messages(provider: str, payload: Mapping[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if isinstance(payload.get("instructions"), str) and payload["instructions"]:
        out.append({"role": "system", "content": payload["instructions"]})
    for item in input_items(payload):
        kind = item.get("type", "message")
        if kind == "message":
            role = "system" if item.get("role") == "developer" else str(item.get("role"))
            out.append({"role": role, "content": _parts(provider, item.get("content"), role == "assistant")})
        elif kind == "function_call":
            call = {"id": item.get("call_id") or item.get("id"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments") or ""}}
            if out and out[-1]["role"] == "assistant" and out[-1].get("tool_calls") is not None:
                out[-1]["tool_calls"].append(call)  # parallel calls: one assistant turn
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            out.append({"role": "tool", "tool_call_id": item.get("call_id"),
                        "content": _parts(provider, item.get("output"), True)})
        elif kind != "reasoning":  # reasoning items are the model's own notes: chat has no place for them
            raise Unsupported(provider, f"'{kind}' input items")
    return out


def to_chat(provider: str, payload: Mapping[str, Any]) -> dict[str, Any]:
    """The chat request that asks what `payload` asks."""
    for field, what in _REFUSED:
        if payload.get(field):
            raise Unsupported(provider, what)
    chat: dict[str, Any] = {"model": payload.get("model"), "messages": _messages(provider, payload)}
    chat.update({k: payload[k] for k in _COPIED if k in payload})
    if isinstance(payload.get("max_output_tokens"), int):
        chat["max_tokens"] = payload["max_output_tokens"]
    tools = []
    for t in payload.get("tools") or ():
        if not isinstance(t, dict) or t.get("type") != "function":
            raise Unsupported(provider, f"the built-in tool '{t.get('type') if isinstance(t, dict) else t}'")
        tools.append({"type": "function", "function": {k: t[k] for k in ("name", "description", "parameters", "strict")
                                                       if k in t}})
    if tools:
        chat["tools"] = tools
    else:
        chat.pop("parallel_tool_calls", None)  # chat refuses it without tools
    choice = payload.get("tool_choice")
    if isinstance(choice, str):
        chat["tool_choice"] = choice
    elif isinstance(choice, dict) and choice.get("type") == "function":
        chat["tool_choice"] = {"type": "function", "function": {"name": choice.get("name")}}
    elif choice is not None:
        kind = choice.get("type") if isinstance(choice, dict) else choice
        raise Unsupported(provider, f"a tool_choice of type '{kind}'")
    fmt = (payload.get("text") or {}).get("format") if isinstance(payload.get("text"), dict) else None
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        chat["response_format"] = {"type": "json_schema", "json_schema": {
            k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}}
    elif isinstance(fmt, dict) and fmt.get("type") == "json_object":
        chat["response_format"] = {"type": "json_object"}
    effort = (payload.get("reasoning") or {}).get("effort") if isinstance(payload.get("reasoning"), dict) else None
    if effort:
        chat["reasoning_effort"] = effort
    include = payload.get("include")
    if isinstance(include, list) and "message.output_text.logprobs" in include:
        chat["logprobs"] = True
        if isinstance(payload.get("top_logprobs"), int):
            chat["top_logprobs"] = payload["top_logprobs"]
    if chat.get("stream"):
        chat["stream_options"] = {"include_usage": True}
    return chat


def usage(u: Any) -> dict[str, Any] | None:
    """Chat usage under the Responses API's names, read as margin meters chat (cache reads and
    writes in any provider's spelling; `cache_write_tokens` is margin's, so they stay priced)."""
    parsed = parse_usage({"usage": u})
    if parsed is None:
        return None
    return {"input_tokens": parsed.input_tokens,
            "input_tokens_details": {"cached_tokens": parsed.cached_input_tokens,
                                     **({"cache_write_tokens": parsed.cache_write_tokens}
                                        if parsed.cache_write_tokens else {})},
            "output_tokens": parsed.output_tokens,
            "output_tokens_details": {"reasoning_tokens": parsed.reasoning_tokens},
            "total_tokens": parsed.input_tokens + parsed.output_tokens}


def _response(req: Mapping[str, Any], rid: str, model: str, status: str, output: list[dict[str, Any]],
              use: dict[str, Any] | None, created: int | None = None) -> dict[str, Any]:
    return {"id": rid, "object": "response", "created_at": created or int(time.time()), "status": status,
            "model": model, "output": output, "usage": use, "error": None, "incomplete_details": None,
            "instructions": req.get("instructions"), "max_output_tokens": req.get("max_output_tokens"),
            "metadata": req.get("metadata") or {}, "parallel_tool_calls": req.get("parallel_tool_calls", True),
            "previous_response_id": None, "temperature": req.get("temperature"), "top_p": req.get("top_p"),
            "tool_choice": req.get("tool_choice", "auto"), "tools": req.get("tools") or [],
            "text": req.get("text") or {"format": {"type": "text"}}}


def _message(rid: str, text: str, done: bool, logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    part: dict[str, Any] = {"type": "output_text", "text": text, "annotations": []}
    if logprobs is not None:
        part["logprobs"] = logprobs
    return {"id": "msg_" + rid, "type": "message", "role": "assistant",
            "status": "completed" if done else "in_progress", "content": [part] if done else []}


def _reasoning(rid: str, text: str, done: bool) -> dict[str, Any]:
    return {"id": "rs_" + rid, "type": "reasoning", "summary": [], "status": "completed" if done else "in_progress",
            "content": [{"type": "reasoning_text", "text": text}] if done else []}


def _function_call(call_id: str, name: str, arguments: str, done: bool) -> dict[str, Any]:
    return {"id": "fc_" + call_id, "type": "function_call", "status": "completed" if done else "in_progress",
            "call_id": call_id, "name": name, "arguments": arguments}


def from_chat(req: Mapping[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    """A whole chat completion as the Response the request asked for."""
    rid = str(data.get("id") or f"{time.time_ns()}")
    choices = data.get("choices") or [{}]
    choice = choices[0] if isinstance(choices[0], dict) else {}
    msg = choice.get("message") or {}
    output: list[dict[str, Any]] = []
    if isinstance(msg.get("reasoning_content"), str) and msg["reasoning_content"]:
        output.append(_reasoning(rid, msg["reasoning_content"], True))
    text = msg.get("content") or msg.get("refusal")
    if text:
        lp = (choice.get("logprobs") or {}).get("content") if isinstance(choice.get("logprobs"), dict) else None
        output.append(_message(rid, str(text), True, lp if isinstance(lp, list) else None))
    for tc in msg.get("tool_calls") or ():
        fn = tc.get("function") or {}
        output.append(_function_call(str(tc.get("id")), str(fn.get("name")), str(fn.get("arguments") or ""), True))
    r = _response(req, "resp_" + rid, str(data.get("model") or req.get("model")), "completed", output,
                  usage(data.get("usage")), data.get("created"))
    _finish(r, str(choice.get("finish_reason") or ""))
    if isinstance(data.get("timings"), dict):  # llama.cpp's server-side timings: pools read them
        r["timings"] = data["timings"]
    return r


def _finish(r: dict[str, Any], finish_reason: str) -> None:
    """A chat finish reason as the Response's status: cut short (length, content filter) is incomplete."""
    reason = {"length": "max_output_tokens", "content_filter": "content_filter"}.get(finish_reason)
    if reason:
        r["status"], r["incomplete_details"] = "incomplete", {"reason": reason}


def _event(kind: str, seq: int, **fields: Any) -> Chunk:
    data = {"type": kind, "sequence_number": seq, **fields}
    return Chunk(b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n", data)


class StreamConverter:
    """Chat completion chunks in, Responses stream events out (with `sequence_number`s)."""

    def __init__(self, req: Mapping[str, Any]):
        self.req = req
        self.seq = 0
        self.rid = ""
        self.model = str(req.get("model") or "")
        self.text = ""
        self.reasoning = ""
        self.message_at: int | None = None  # output index of the message item, once opened
        self.reasoning_at: int | None = None  # ... and of the reasoning item
        self.calls: dict[int, tuple[int, dict[str, Any]]] = {}  # chat tool-call index -> (output index, item)
        self.opened = 0  # output items opened so far
        self.finish = ""
        self.usage: dict[str, Any] | None = None

    def _ev(self, kind: str, **fields: Any) -> Chunk:
        self.seq += 1
        return _event(kind, self.seq - 1, **fields)

    def _start(self, data: dict[str, Any]) -> list[Chunk]:
        self.rid = str(data.get("id") or f"{time.time_ns()}")
        self.model = str(data.get("model") or self.model)
        r = _response(self.req, "resp_" + self.rid, self.model, "in_progress", [], None)
        return [self._ev("response.created", response=r), self._ev("response.in_progress", response=r)]

    def feed(self, data: dict[str, Any]) -> list[Chunk]:
        out = [] if self.rid else self._start(data)
        if isinstance(data.get("usage"), dict):
            self.usage = usage(data["usage"])
        if "error" in data and not data.get("choices"):
            err = data["error"] if isinstance(data["error"], dict) else {"message": str(data["error"])}
            out.append(self._ev("error", code=err.get("code"), message=str(err.get("message") or "upstream error"),
                                param=err.get("param")))
        for choice in data.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta") or {}
            thought = delta.get("reasoning_content")
            if isinstance(thought, str) and thought:
                if self.reasoning_at is None:
                    self.reasoning_at, self.opened = self.opened, self.opened + 1
                    out.append(self._ev("response.output_item.added", output_index=self.reasoning_at,
                                        item=_reasoning(self.rid, "", False)))
                self.reasoning += thought
                out.append(self._ev("response.reasoning_text.delta", output_index=self.reasoning_at, content_index=0,
                                    item_id="rs_" + self.rid, delta=thought))
            piece = delta.get("content") or delta.get("refusal")
            if isinstance(piece, str) and piece:
                if self.message_at is None:
                    self.message_at, self.opened = self.opened, self.opened + 1
                    out.append(self._ev("response.output_item.added", output_index=self.message_at,
                                        item=_message(self.rid, "", False)))
                    out.append(self._ev("response.content_part.added", output_index=self.message_at, content_index=0,
                                        item_id="msg_" + self.rid,
                                        part={"type": "output_text", "text": "", "annotations": []}))
                self.text += piece
                out.append(self._ev("response.output_text.delta", output_index=self.message_at, content_index=0,
                                    item_id="msg_" + self.rid, delta=piece))
            for tc in delta.get("tool_calls") or ():
                out.extend(self._tool_delta(tc))
            if choice.get("finish_reason"):
                self.finish = str(choice["finish_reason"])
        return out

    def _tool_delta(self, tc: dict[str, Any]) -> list[Chunk]:
        out = []
        i = int(tc.get("index") or 0)
        fn = tc.get("function") or {}
        if i not in self.calls:
            item = _function_call(str(tc.get("id") or f"call_{self.rid}_{i}"), str(fn.get("name") or ""), "", False)
            self.calls[i] = (self.opened, item)
            self.opened += 1
            out.append(self._ev("response.output_item.added", output_index=self.calls[i][0], item=dict(item)))
        at, item = self.calls[i]
        if fn.get("arguments"):
            item["arguments"] += str(fn["arguments"])
            out.append(self._ev("response.function_call_arguments.delta", output_index=at, item_id=item["id"],
                                delta=str(fn["arguments"])))
        return out

    def close(self) -> list[Chunk]:
        """The closing events once the chat stream said [DONE]: items done, then the response."""
        out = [] if self.rid else self._start({})
        items: list[tuple[int, dict[str, Any]]] = []
        if self.reasoning_at is not None:
            out.append(self._ev("response.reasoning_text.done", output_index=self.reasoning_at, content_index=0,
                                item_id="rs_" + self.rid, text=self.reasoning))
            items.append((self.reasoning_at, _reasoning(self.rid, self.reasoning, True)))
        if self.message_at is not None:
            msg, rid = _message(self.rid, self.text, True), "msg_" + self.rid
            out.append(self._ev("response.output_text.done", output_index=self.message_at, content_index=0,
                                item_id=rid, text=self.text))
            out.append(self._ev("response.content_part.done", output_index=self.message_at, content_index=0,
                                item_id=rid, part=msg["content"][0]))
            items.append((self.message_at, msg))
        for at, item in self.calls.values():
            item["status"] = "completed"
            out.append(self._ev("response.function_call_arguments.done", output_index=at, item_id=item["id"],
                                arguments=item["arguments"]))
            items.append((at, item))
        items.sort(key=lambda x: x[0])
        for at, item in items:
            out.append(self._ev("response.output_item.done", output_index=at, item=item))
        final = _response(self.req, "resp_" + self.rid, self.model, "completed", [it for _, it in items], self.usage)
        _finish(final, self.finish)
        out.append(self._ev(f"response.{final['status']}", response=final))
        return out


class ResponsesViaChat:
    """A Provider that answers the "response" endpoint through its inner provider's chat one."""

    def __init__(self, inner: Provider):
        self.inner = inner
        self.name, self.kind = inner.name, inner.kind

    async def start(self) -> None:
        await self.inner.start()

    async def close(self) -> None:
        await self.inner.close()

    async def send(self, endpoint: Endpoint, payload: dict[str, Any],
                   headers: Mapping[str, str] | None = None) -> Reply:
        if endpoint != "response":
            return await self.inner.send(endpoint, payload, headers)
        reply = await self.inner.send("chat", to_chat(self.name, payload), headers)
        data = from_chat(payload, reply.data)
        return Reply(reply.status, orjson.dumps(data), data, reply.meta)

    def stream(self, endpoint: Endpoint, payload: dict[str, Any],
               headers: Mapping[str, str] | None = None) -> AsyncIterator[Chunk]:
        if endpoint != "response":
            return self.inner.stream(endpoint, payload, headers)
        return self._stream(payload, headers)

    async def _stream(self, payload: dict[str, Any], headers: Mapping[str, str] | None) -> AsyncIterator[Chunk]:
        conv = StreamConverter(payload)
        chunks = self.inner.stream("chat", to_chat(self.name, payload), headers)
        try:
            async for chunk in chunks:
                if chunk.data is None:  # [DONE]: close the response; it ends the stream, as natively
                    for c in conv.close():
                        yield c
                    yield Chunk(b"", None)
                    return
                for i, c in enumerate(conv.feed(chunk.data)):
                    yield Chunk(c.raw, c.data, chunk.meta if i == 0 else None)  # a pool's replica choice rides along
        finally:
            await chunks.aclose()  # type: ignore[attr-defined]
