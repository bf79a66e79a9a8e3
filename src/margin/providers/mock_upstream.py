"""`margin mock-upstream`: a deterministic OpenAI-compatible server standing in for a paid provider.

Server choice, measured with `wrk -t1 -c50 -d6s` on a small non-streaming chat request (2-core box
shared with other jobs, so throughput is noisy; server CPU time per request is the steadier figure):

    aiohttp.web + uvloop:                  2.8k-11.5k req/s, 58-84 us CPU/req (median ~65)
    raw ASGI on uvicorn+uvloop+httptools:  3.0k-15.2k req/s, 44-66 us CPU/req (median ~48)

so this is a raw ASGI app on uvicorn (access log, lifespan, proxy/server/date headers off). The
finished mock: 7.7k-11k req/s, 55-66 us CPU/req non-streaming; 6.3k-9.3k req/s, 68-91 us streaming
16 tokens with include_usage.

Streams: one token ("word ") per content chunk, the first also carrying the role, so there are
completion_tokens - reasoning_tokens content chunks; then a finish chunk, the usage chunk (only
with `stream_options.include_usage`), and `[DONE]`. `/v1/responses` answers the same tokens in the
Responses API's shapes (mock_responses.py: the chat answer through margin's chat bridge).

Faults: `error_rate`, `timeout_rate` and `reset_rate` share one PRNG draw per POST request, seeded
from `seed`, so a run with the same request order fails the same requests. Per-request `X-Mock-*`
headers override everything (see `mock_options.Overrides`).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from random import Random
from typing import Any

import orjson
import uvicorn

from margin.domain import responses
from margin.providers import mock_batches, mock_responses, mock_text
from margin.providers.mock_options import MockOptions, Overrides

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

DEFAULT_MODELS = ("gpt-4o-mini", "gpt-4o", "text-embedding-3-small", "mock-model")
EMBEDDING_DIM = 8
HANG_S = 3600.0

_JSON = [(b"content-type", b"application/json")]
_SSE = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
_NOT_JSON = b"this is not json {"


__all__ = ["MockOptions", "serve", "start_mock"]  # MockOptions lives in mock_options; kept importable here

_NO_OVERRIDES = Overrides()


@dataclass(slots=True)
class _Answer:
    """What a generation request will produce, computed before any waiting."""

    tokens: list[str]
    finish_reason: str
    usage: dict[str, Any] | None


@dataclass(slots=True)
class MockApp:
    """The ASGI app. Mutable state (PRNG, counters, last request) lives here, one per server."""

    options: MockOptions
    last_request: bytes = b"null"
    requests: int = 0
    _rng: Random = field(init=False)
    _faulty: bool = field(init=False)
    _models_body: bytes = field(init=False)
    batches: mock_batches.MockBatches | None = None  # the batch API, created on first use

    def __post_init__(self) -> None:
        o = self.options
        self._rng = Random(o.seed)
        self._faulty = o.error_rate > 0 or o.timeout_rate > 0 or o.reset_rate > 0
        ids = [m.strip() for m in o.models.split(",") if m.strip()] or list(DEFAULT_MODELS)
        self._models_body = orjson.dumps(
            {
                "object": "list",
                "data": [{"id": m, "object": "model", "created": 0, "owned_by": "mock"} for m in ids],
            }
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        if method == "POST" and path in _POST_ROUTES:
            await self._generate(path, scope, receive, send)
        elif method == "GET" and path == "/health":
            await _respond(send, 200, b'{"status":"ok"}')
        elif method == "GET" and path == "/v1/models":
            await _respond(send, 200, self._models_body)
        elif method == "GET" and path == "/mock/last_request":
            await _respond(send, 200, self.last_request)
        elif method == "GET" and path == "/mock/stats":
            await _respond(send, 200, orjson.dumps({"requests": self.requests}))
        elif path.startswith(mock_batches.PREFIXES):  # OpenAI-style files + batches (mock_batches.py)
            o = self.options
            self.batches = self.batches or mock_batches.MockBatches(o.seed, o.output_tokens, o.cached_fraction)
            await self.batches.handle(method, path, scope, receive, send)
        else:
            await _respond(send, 404, mock_text.error_body(404, f"no route {method} {path}"))

    async def _generate(self, path: str, scope: Scope, receive: Receive, send: Send) -> None:
        body = await _read_body(receive)
        self.requests += 1
        try:
            req = orjson.loads(body)
            if not isinstance(req, dict):
                raise ValueError("body must be a JSON object")
        except ValueError as exc:
            await _respond(send, 400, mock_text.error_body(400, f"invalid JSON body: {exc}"))
            return
        self.last_request = body
        ov = Overrides.parse(scope["headers"]) or _NO_OVERRIDES
        stream = path != "/v1/embeddings" and req.get("stream") is True

        if ov.status is not None and ov.status >= 400:
            await _respond(send, ov.status, mock_text.error_body(ov.status, f"mock status {ov.status}"))
            return
        reset, hang = ov.reset, ov.hang
        if self._faulty:
            o, r = self.options, self._rng.random()
            if r < o.error_rate:
                await _respond(send, 500, mock_text.error_body(500, "mock injected error"))
                return
            hang = hang or r < o.error_rate + o.timeout_rate
            reset = reset or (stream and r < o.error_rate + o.timeout_rate + o.reset_rate)
        if hang:
            # Wait for the client to give up (receive() returns http.disconnect) so hung requests
            # do not pile up as tasks during long benchmarks.
            try:
                await asyncio.wait_for(receive(), HANG_S)
            except TimeoutError:
                pass
            except asyncio.CancelledError:  # server shutdown: drop quietly instead of a logged 500
                await _abort(send)
            return
        if reset and not stream:
            await _abort(send)
            return

        ttft = (ov.ttft_ms if ov.ttft_ms is not None else self.options.ttft_ms) / 1000.0
        if ov.invalid_json:
            await _sleep(ttft)
            if stream:
                await _respond(send, 200, b"data: " + _NOT_JSON + b"\n\n" + mock_text.DONE, _SSE)
            else:
                await _respond(send, 200, _NOT_JSON)
            return
        model = str(req.get("model") or "")
        o = self.options
        if path == "/v1/embeddings":
            dims = req.get("dimensions")
            body = mock_text.embeddings_body(
                o.seed,
                model,
                req.get("input", ""),
                dims if isinstance(dims, int) and dims > 0 else EMBEDDING_DIM,
                req.get("encoding_format") == "base64",
                ov.usage if ov.usage is not None else o.usage,
            )
            await _sleep(ttft)
            await _respond(send, 200, body)
            return
        chat, resp = path == "/v1/chat/completions", path == "/v1/responses"
        tps = ov.tokens_per_s if ov.tokens_per_s is not None else o.tokens_per_s
        ans = self._answer(req, model, chat, ov, resp)
        rid = f"{'chatcmpl' if chat or resp else 'cmpl'}-mock{self.requests}"  # a Response is its chat answer
        tools = req.get("tools")
        if (chat or resp) and ov.tool_calls and isinstance(tools, list) and tools:  # X-Mock-Tool-Calls: n
            t0 = tools[0] if isinstance(tools[0], dict) else {}
            name = str(t0.get("name") or (t0.get("function") or {}).get("name") or "tool")
            calls = mock_text.tool_calls(name, ov.tool_calls, "".join(ans.tokens))
            await _sleep(ttft)
            so = req.get("stream_options")
            use = ans.usage if not stream or resp or (isinstance(so, dict) and so.get("include_usage")) else None
            out = (mock_text.tool_call_events(rid, model, calls, use) if stream
                   else mock_text.tool_call_body(rid, model, calls, ans.usage))
            if resp:
                out = mock_responses.events(req, [], out)[1] if stream else mock_responses.body(req, out)
            await _respond(send, 200, out, _SSE if stream else _JSON)
            return
        if stream:
            await self._stream(send, req, rid, model, chat, ans, ttft, reset, tps, resp)
            return
        await _sleep(ttft + (len(ans.tokens) / tps if tps > 0 else 0.0))
        out = mock_text.completion_body(rid, model, chat or resp, ans.tokens, ans.finish_reason, ans.usage,
                                        self._logprob(req, ov))
        await _respond(send, 200, mock_responses.body(req, out) if resp else out)

    @property
    def _answers(self) -> dict[str, str]:
        return dict(orjson.loads(self.options.answers)) if self.options.answers else {}

    def _logprob(self, req: dict[str, Any], ov: Overrides) -> float | None:
        include = req.get("include")
        if not (req.get("logprobs") or (isinstance(include, list) and "message.output_text.logprobs" in include)):
            return None
        return ov.logprob if ov.logprob is not None else self.options.logprob

    def _answer(self, req: dict[str, Any], model: str, chat: bool, ov: Overrides, resp: bool = False) -> _Answer:
        o = self.options
        if chat or resp:
            prompt, prompt_tokens = mock_text.chat_prompt(req.get("messages") if chat else responses.as_messages(req))
        else:
            items = mock_text.inputs_of(req.get("prompt", ""))
            prompt, prompt_tokens = "\n".join(t for t, _ in items), sum(n for _, n in items)
        n = ov.output_tokens if ov.output_tokens is not None else o.output_tokens
        finish = "stop"
        cap = req.get("max_output_tokens") if resp else (req.get("max_completion_tokens") or req.get("max_tokens"))
        if isinstance(cap, int) and 0 < cap < n:
            n, finish = cap, "length"
        fixed = self._answers.get(model)
        tokens = mock_text.tokens_for(o.seed, model, prompt, n) if fixed is None else [
            w if i == 0 else " " + w for i, w in enumerate(fixed.split())]
        if not (ov.usage if ov.usage is not None else o.usage):
            return _Answer(tokens, finish, None)
        cached = ov.cached_tokens if ov.cached_tokens is not None else int(prompt_tokens * o.cached_fraction)
        reasoning = ov.reasoning_tokens if ov.reasoning_tokens is not None else o.reasoning_tokens
        return _Answer(tokens, finish, mock_text.usage(prompt_tokens, len(tokens), cached, reasoning))

    async def _stream(
        self,
        send: Send,
        req: dict[str, Any],
        rid: str,
        model: str,
        chat: bool,
        ans: _Answer,
        ttft: float,
        reset: bool,
        tps: float,
        resp: bool = False,
    ) -> None:
        so = req.get("stream_options")
        include_usage = isinstance(so, dict) and so.get("include_usage") is True
        events, tail = mock_text.stream_events(  # a Responses stream always ends with its usage
            rid, model, chat or resp, ans.tokens, ans.finish_reason, ans.usage if include_usage or resp else None
        )
        if resp:
            events, tail = mock_responses.events(req, events, tail)
        await _sleep(ttft)
        await send({"type": "http.response.start", "status": 200, "headers": _SSE})
        cut = len(ans.tokens) // 2 if reset else len(events)
        if tps > 0:
            for i, ev in enumerate(events[:cut]):
                if i:
                    await asyncio.sleep(1.0 / tps)
                await send({"type": "http.response.body", "body": ev, "more_body": True})
        elif cut:  # unpaced: one write is cheaper than one per token
            await send({"type": "http.response.body", "body": b"".join(events[:cut]), "more_body": True})
        if reset:
            await _abort(send)
            return
        await send({"type": "http.response.body", "body": tail, "more_body": False})


_POST_ROUTES = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses"})


async def _read_body(receive: Receive) -> bytes:
    msg = await receive()
    body: bytes = msg.get("body", b"")
    if not msg.get("more_body"):
        return body  # the common case: one message, no copying
    parts = [body]
    while msg.get("more_body"):
        msg = await receive()
        parts.append(msg.get("body", b""))
    return b"".join(parts)


async def _respond(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] = _JSON) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [*headers, (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _sleep(seconds: float) -> None:
    if seconds > 0:
        await asyncio.sleep(seconds)


async def _abort(send: Send) -> None:
    """Drop the connection abruptly. ASGI has no abort, so reach uvicorn's transport through the
    bound `send` (RequestResponseCycle.send)."""
    cycle = getattr(send, "__self__", None)
    transport = getattr(cycle, "transport", None)
    if transport is None or not hasattr(transport, "abort"):  # uvloop transports are not asyncio.Transport
        raise ConnectionAbortedError("mock reset")  # fallback: the server closes the connection
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            # Linger 0 turns the close into a TCP RST, i.e. a real "connection reset by peer".
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()
    # Let connection_lost() run before we return, or uvicorn logs an unfinished response (and
    # tries to send a 500) for what is an intentional drop.
    for _ in range(10):
        if getattr(cycle, "disconnected", True):
            break
        await asyncio.sleep(0)


def _config(host: str, port: int, options: MockOptions) -> uvicorn.Config:
    return uvicorn.Config(
        MockApp(options),
        host=host,
        port=port,
        loop="uvloop",
        http="httptools",
        lifespan="off",
        interface="asgi3",
        proxy_headers=False,  # also keeps `send` the bare bound method that _abort() relies on
        access_log=False,
        log_level="warning",
        server_header=False,
        date_header=False,
        timeout_graceful_shutdown=1,  # do not wait an hour for hung requests on Ctrl-C
    )


def serve(host: str, port: int, options: MockOptions) -> None:
    """Serve until SIGINT/SIGTERM (blocking)."""
    uvicorn.Server(_config(host, port, options)).run()


@dataclass(slots=True)
class MockHandle:
    """A mock running inside the caller's event loop; `app` gives direct access to its state."""

    server: uvicorn.Server
    task: asyncio.Task[None]
    app: MockApp
    host: str
    port: int

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    async def close(self) -> None:
        self.server.should_exit = True
        await self.task


async def start_mock(
    host: str = "127.0.0.1", port: int = 0, options: MockOptions | None = None
) -> MockHandle:
    """Start the mock in the running loop; `port=0` picks a free port (see `handle.port`)."""
    config = _config(host, port, options or MockOptions())
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            await task  # surfaces the startup error (e.g. port in use)
            raise RuntimeError("mock upstream exited during startup")
        await asyncio.sleep(0.005)
    bound = server.servers[0].sockets[0].getsockname()[1]
    app = config.app
    assert isinstance(app, MockApp)
    return MockHandle(server, task, app, host, int(bound))
