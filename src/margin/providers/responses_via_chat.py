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
from margin.providers.base import Chunk, Provider, Reply, UpstreamError

_COPIED = ("temperature", "top_p", "parallel_tool_calls", "user", "stream")
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
    if assistant or all(p["type"] == "text" for p in parts):  # plain text: the form every server reads
        return "".join(p["text"] for p in parts)
    return parts


def _messages(provider: str, payload: Mapping[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if isinstance(payload.get("instructions"), str) and payload["instructions"]:
        out.append({"role": "system", "content": payload["instructions"]})
    items = payload.get("input")
    if isinstance(items, str):
        return [*out, {"role": "user", "content": items}]
    for item in items if isinstance(items, list) else ():
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
    for stored in ("previous_response_id", "conversation"):
        if payload.get(stored):
            raise Unsupported(provider, f"'{stored}' (stored responses)")
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
    choice = payload.get("tool_choice")
    if isinstance(choice, str):
        chat["tool_choice"] = choice
    elif isinstance(choice, dict) and choice.get("type") == "function":
        chat["tool_choice"] = {"type": "function", "function": {"name": choice.get("name")}}
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
    if chat.get("stream"):
        chat["stream_options"] = {"include_usage": True}
    return chat


def usage(u: Any) -> dict[str, Any] | None:
    """Chat usage under the Responses API's names."""
    if not isinstance(u, dict):
        return None
    pd, cd = u.get("prompt_tokens_details") or {}, u.get("completion_tokens_details") or {}
    inp, out = int(u.get("prompt_tokens") or 0), int(u.get("completion_tokens") or 0)
    return {"input_tokens": inp, "input_tokens_details": {"cached_tokens": int(pd.get("cached_tokens") or 0)},
            "output_tokens": out, "output_tokens_details": {"reasoning_tokens": int(cd.get("reasoning_tokens") or 0)},
            "total_tokens": int(u.get("total_tokens") or inp + out)}


def _response(req: Mapping[str, Any], rid: str, model: str, status: str, output: list[dict[str, Any]],
              use: dict[str, Any] | None, created: int | None = None) -> dict[str, Any]:
    return {"id": rid, "object": "response", "created_at": created or int(time.time()), "status": status,
            "model": model, "output": output, "usage": use, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
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
    text = msg.get("content") or msg.get("refusal")
    if text:
        lp = (choice.get("logprobs") or {}).get("content") if isinstance(choice.get("logprobs"), dict) else None
        output.append(_message(rid, str(text), True, lp if isinstance(lp, list) else None))
    for tc in msg.get("tool_calls") or ():
        fn = tc.get("function") or {}
        output.append(_function_call(str(tc.get("id")), str(fn.get("name")), str(fn.get("arguments") or ""), True))
    status = "incomplete" if choice.get("finish_reason") == "length" else "completed"
    return _response(req, "resp_" + rid, str(data.get("model") or req.get("model")), status, output,
                     usage(data.get("usage")), data.get("created"))


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
        self.message_at: int | None = None  # output index of the message item, once opened
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
        status = "incomplete" if self.finish == "length" else "completed"
        final = _response(self.req, "resp_" + self.rid, self.model, status, [it for _, it in items], self.usage)
        out.append(self._ev(f"response.{status}", response=final))
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
