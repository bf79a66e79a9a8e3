"""The simulated provider's batch API, OpenAI style: `POST /v1/files` (multipart JSONL upload),
`GET /v1/files/{id}/content`, `POST /v1/batches`, `GET /v1/batches[/{id}]`,
`POST /v1/batches/{id}/cancel`. A batch completes `batch_delay_s` after it is created, each line
answered exactly as the live endpoints would (same deterministic text and usage). `GET /mock/batches`
counts batches and requests, so tests can tell what was submitted (and that nothing was twice)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs

import orjson

from margin.domain import responses
from margin.providers import mock_responses, mock_text
from margin.providers.openai_batch import MultipartError, parse_multipart

Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]
PREFIXES = ("/v1/files", "/v1/batches", "/mock/batches")
_PATHS = {"/v1/chat/completions": "chat", "/v1/completions": "completion", "/v1/embeddings": "embedding",
          "/v1/responses": "response"}


async def _respond(send: Send, status: int, body: bytes, ctype: bytes = b"application/json") -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", ctype), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def _body(receive: Receive) -> bytes:
    parts = []
    while True:
        msg = await receive()
        parts.append(msg.get("body", b""))
        if not msg.get("more_body"):
            return b"".join(parts)


class MockBatches:
    def __init__(self, seed: int, output_tokens: int, cached_fraction: float, batch_delay_s: float = 0.3):
        self.seed, self.output_tokens, self.cached_fraction = seed, output_tokens, cached_fraction
        self.delay_s = batch_delay_s
        self.files: dict[str, tuple[str, bytes]] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self.requests = 0
        self._n = 0
        self._tasks: set[asyncio.Task[None]] = set()

    def _id(self, prefix: str) -> str:
        self._n += 1
        return f"{prefix}{self._n:08d}"  # increasing, so newest-first listing is by id

    async def handle(self, method: str, path: str, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        parts = path.strip("/").split("/")  # v1 files|batches id? action?
        if path == "/mock/batches":
            await _respond(send, 200, orjson.dumps({"batches": len(self.batches), "requests": self.requests}))
        elif parts[1] == "files" and len(parts) == 2 and method == "POST":
            try:
                form = parse_multipart(dict(scope["headers"]).get(b"content-type", b"").decode(), await _body(receive))
            except MultipartError as e:
                await _respond(send, 400, mock_text.error_body(400, str(e)))
                return
            fid = self._id("file-mock")
            self.files[fid] = (form["file"].filename or "in.jsonl", form["file"].data)
            await _respond(send, 200, orjson.dumps({"id": fid, "object": "file", "bytes": len(form["file"].data),
                                                    "created_at": int(time.time()), "filename": self.files[fid][0],
                                                    "purpose": "batch"}))
        elif parts[1] == "files" and len(parts) == 4 and parts[3] == "content" and parts[2] in self.files:
            await _respond(send, 200, self.files[parts[2]][1], b"application/jsonl")
        elif parts[1] == "batches" and len(parts) == 2 and method == "POST":
            await self._create(send, orjson.loads(await _body(receive)))
        elif parts[1] == "batches" and len(parts) == 2 and method == "GET":
            q = parse_qs(scope.get("query_string", b"").decode())
            ids = sorted(self.batches, reverse=True)
            if "after" in q:
                ids = [i for i in ids if i < q["after"][0]]
            limit = int(q.get("limit", ["20"])[0])
            await _respond(send, 200, orjson.dumps({"object": "list", "data": [self.batches[i] for i in ids[:limit]],
                                                    "has_more": len(ids) > limit}))
        elif parts[1] == "batches" and len(parts) >= 3 and parts[2] in self.batches:
            b = self.batches[parts[2]]
            if len(parts) == 4 and parts[3] == "cancel" and method == "POST" and b["status"] in ("validating",
                                                                                                  "in_progress"):
                b.update(status="cancelling", cancelling_at=int(time.time()))
            await _respond(send, 200, orjson.dumps(b))
        else:
            await _respond(send, 404, mock_text.error_body(404, f"no route {method} {path}"))

    async def _create(self, send: Send, req: dict[str, Any]) -> None:
        fid = req.get("input_file_id")
        if fid not in self.files or req.get("endpoint") not in _PATHS:
            await _respond(send, 400, mock_text.error_body(400, "unknown input_file_id or endpoint"))
            return
        now = int(time.time())
        lines = [ln for ln in self.files[fid][1].splitlines() if ln.strip()]
        bid = self._id("batch_mock")
        self.batches[bid] = {
            "id": bid, "object": "batch", "endpoint": req["endpoint"], "errors": None, "input_file_id": fid,
            "completion_window": req.get("completion_window", "24h"), "status": "in_progress",
            "output_file_id": None, "error_file_id": None, "created_at": now, "in_progress_at": now,
            "expires_at": now + 86400, "completed_at": None, "cancelling_at": None, "cancelled_at": None,
            "request_counts": {"total": len(lines), "completed": 0, "failed": 0}, "metadata": req.get("metadata"),
        }
        task = asyncio.create_task(self._run(bid, lines))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        await _respond(send, 200, orjson.dumps(self.batches[bid]))

    async def _run(self, bid: str, lines: list[bytes]) -> None:
        await asyncio.sleep(self.delay_s)
        b = self.batches[bid]
        cancelled = b["status"] == "cancelling"
        out, err = [], []
        for i, raw in enumerate(lines):
            line = orjson.loads(raw)
            head = {"id": f"batch_req_mock{i}", "custom_id": line.get("custom_id")}
            if cancelled:
                err.append(orjson.dumps({**head, "response": None, "error": {
                    "code": "batch_cancelled", "message": "This request was not executed because the batch was "
                                                          "cancelled."}}))
                continue
            self.requests += 1
            body = self._answer(str(line.get("url")), line.get("body") or {}, f"batchreq-mock{self.requests}")
            out.append(orjson.dumps({**head, "response": {"status_code": 200, "request_id": f"req_mock{i}",
                                                          "body": orjson.loads(body)}, "error": None}))
        for kind, content in (("output_file_id", out), ("error_file_id", err)):
            if content:
                fid = self._id("file-mock")
                self.files[fid] = (f"{bid}_{kind}.jsonl", b"\n".join(content) + b"\n")
                b[kind] = fid
        now = int(time.time())
        b.update(status="cancelled" if cancelled else "completed", completed_at=None if cancelled else now,
                 cancelled_at=now if cancelled else None,
                 request_counts={"total": len(lines), "completed": len(out), "failed": len(err)})

    def _answer(self, url: str, req: dict[str, Any], rid: str) -> bytes:
        """What the live endpoint would answer (no X-Mock-* overrides apply in a batch)."""
        model = str(req.get("model") or "")
        if _PATHS.get(url) == "embedding":
            return mock_text.embeddings_body(self.seed, model, req.get("input", ""), 8, False, True)
        chat, resp = _PATHS.get(url) == "chat", _PATHS.get(url) == "response"
        if chat or resp:
            prompt, prompt_tokens = mock_text.chat_prompt(req.get("messages") if chat else responses.as_messages(req))
        else:
            items = mock_text.inputs_of(req.get("prompt", ""))
            prompt, prompt_tokens = "\n".join(t for t, _ in items), sum(n for _, n in items)
        n, finish = self.output_tokens, "stop"
        cap = req.get("max_output_tokens") if resp else (req.get("max_completion_tokens") or req.get("max_tokens"))
        if isinstance(cap, int) and 0 < cap < n:
            n, finish = cap, "length"
        tokens = mock_text.tokens_for(self.seed, model, prompt, n)
        use = mock_text.usage(prompt_tokens, len(tokens), int(prompt_tokens * self.cached_fraction), 0)
        out = mock_text.completion_body(rid, model, chat or resp, tokens, finish, use)
        return mock_responses.body(req, out) if resp else out
