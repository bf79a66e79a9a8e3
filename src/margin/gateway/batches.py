"""HTTP side of the batch lane, OpenAI-compatible: `/v1/files` (JSONL upload, list, retrieve,
content, delete), `/v1/batches` (create, retrieve, cancel, list) and `/v1/deferred/{id}` (poll a
deferred request). Files and batches belong to the key that created them: no other key sees them
(not even that they exist); the admin key sees all."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import orjson

from margin.gateway.auth import is_admin
from margin.gateway.batch_files import URLS, batch_object, file_object, new_id, parse_jsonl, parse_multipart
from margin.gateway.batch_worker import deferred_view, kept_headers
from margin.gateway.body import read_body
from margin.gateway.errors import BadRequest, GatewayError, MethodNotAllowed, NotFound
from margin.gateway.request import parse_json
from margin.gateway.stream import Headers
from margin.ledger.schema import Row
from margin.ledger.store import StoreUnavailable
from margin.policy import batch as policy

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from margin.domain import VirtualKey
    from margin.gateway.app import MarginApp
    from margin.gateway.batch_worker import BatchLane

PREFIXES = ("/v1/files", "/v1/batches", "/v1/deferred")
JSON: Headers = [(b"content-type", b"application/json")]
Answer = tuple[int, Headers, bytes]
_RESERVED = ("x-margin-tier", "x-margin-priority", "x-request-id")  # the lane sets these itself


class Conflict(GatewayError):
    status, type, code = 409, "invalid_request_error", "conflict"


class LaneUnavailable(GatewayError):
    status, type, code = 503, "api_error", "batch_store_unavailable"


def _json(status: int, obj: Any, extra: Headers | None = None) -> Answer:
    return status, [*JSON, *(extra or [])], orjson.dumps(obj)


def _page(q: dict[str, list[str]]) -> tuple[str | None, int]:
    raw = q.get("limit", ["20"])[0]
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= 100:
        raise BadRequest(f"'limit' must be an integer from 1 to 100, not {raw!r}", param="limit", code="invalid_value")
    return q.get("after", [None])[0], int(raw)


def _listing(data: list[dict[str, Any]], limit: int) -> dict[str, Any]:
    more = len(data) > limit
    data = data[:limit]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": more}


class _Ctx:
    def __init__(self, app: MarginApp, lane: BatchLane, key: VirtualKey | None):
        self.app, self.lane, self.jobs, self.key = app, lane, lane.jobs, key

    @property
    def owner(self) -> str | None:
        return self.key.key_id if self.key is not None else None  # None: admin, sees all

    def mine(self, row: Row | None, what: str, ident: str) -> Row:
        if row is None or (self.key is not None and row["key_id"] != self.key.key_id):
            raise NotFound(f"No {what} with id {ident}", code=f"{what}_not_found")
        return row

    def creator(self) -> VirtualKey:
        if self.key is None:
            raise BadRequest("Create files and batches with a virtual key (mk-...): its requests are charged to it",
                             code="key_required")
        return self.key


async def handle(app: MarginApp, method: str, path: str, scope: dict[str, Any], headers: dict[str, str],
                 receive: Callable[[], Awaitable[dict[str, Any]]]) -> Answer:
    lane = app.lane
    if lane is None:
        raise NotFound("The batch lane is off: set batch_lane.enabled: true in margin.yaml", code="batch_lane_disabled")
    auth = headers.get("authorization")
    key = None if is_admin(auth, app.cfg.admin_key) else await app.keys.authenticate(auth)
    ctx = _Ctx(app, lane, key)
    parts = path.strip("/").split("/")[1:]  # ["files" | "batches" | "deferred", id?, action?]
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    try:
        await lane.ensure_open()
        if parts[0] == "files":
            return await _files(ctx, method, parts[1:], query, headers, receive)
        if parts[0] == "batches":
            body = await read_body(receive, headers, app.max_body) if method == "POST" else b""
            return await _batches(ctx, method, parts[1:], query, headers, body)
        return await _deferred(ctx, method, parts[1:])
    except StoreUnavailable as e:
        raise LaneUnavailable(f"The batch lane's store is unavailable ({e}); retry shortly") from None


async def _files(ctx: _Ctx, method: str, rest: list[str], query: dict[str, list[str]], headers: dict[str, str],
                 receive: Callable[[], Awaitable[dict[str, Any]]]) -> Answer:
    if not rest:
        if method == "POST":
            key = ctx.creator()
            form = parse_multipart(headers.get("content-type"),
                                   await read_body(receive, headers, ctx.lane.cfg.max_file_bytes))
            purpose = form["purpose"].data.decode(errors="replace") if "purpose" in form else ""
            if purpose != "batch":
                raise BadRequest(f"'purpose' must be \"batch\" (margin stores batch input files only), not {purpose!r}",
                                 param="purpose", code="invalid_value")
            if "file" not in form:
                raise BadRequest("Missing the 'file' field (a JSONL file of requests)", param="file",
                                 code="missing_required_parameter")
            lines = parse_jsonl(form["file"].data, ctx.lane.cfg.max_requests)
            row = {"file_id": new_id("file-"), "key_id": key.key_id, "purpose": "batch",
                   "filename": form["file"].filename or "batch.jsonl", "bytes": len(form["file"].data),
                   "lines": len(lines), "created_at": int(time.time()), "batch_id": None, "content": form["file"].data}
            await ctx.jobs.insert_file(row)
            return _json(200, file_object(row))
        if method == "GET":
            after, limit = _page(query)
            rows = await ctx.jobs.list_files(ctx.owner, query.get("purpose", [None])[0], after, limit + 1)
            return _json(200, _listing([file_object(r) for r in rows], limit))
        raise MethodNotAllowed("/v1/files takes GET or POST")
    file_id = rest[0]
    row = ctx.mine(await ctx.jobs.get_file(file_id), "file", file_id)
    if len(rest) == 2 and rest[1] == "content" and method == "GET":
        content = await ctx.jobs.file_content(file_id)
        return 200, [(b"content-type", b"application/jsonl")], content or b""
    if len(rest) == 1 and method == "GET":
        return _json(200, file_object(row))
    if len(rest) == 1 and method == "DELETE":
        await ctx.jobs.delete_file(file_id)
        return _json(200, {"id": file_id, "object": "file", "deleted": True})
    raise NotFound(f"Unknown path /v1/files/{'/'.join(rest)} ({method})", code="unknown_url")


async def _batches(ctx: _Ctx, method: str, rest: list[str], query: dict[str, list[str]], headers: dict[str, str],
                   body: bytes) -> Answer:
    if not rest:
        if method == "POST":
            return await _create(ctx, parse_json(body), headers)
        if method == "GET":
            after, limit = _page(query)
            rows = await ctx.jobs.list_batches(ctx.owner, after, limit + 1)
            counts = await ctx.jobs.item_counts([r["batch_id"] for r in rows])
            return _json(200, _listing([batch_object(r, counts[r["batch_id"]]) for r in rows], limit))
        raise MethodNotAllowed("/v1/batches takes GET or POST")
    batch_id = rest[0]
    row = ctx.mine(await ctx.jobs.get_batch(batch_id), "batch", batch_id)
    if len(rest) == 1 and method == "GET":
        return _json(200, await ctx.lane.batch_view(row))
    if len(rest) == 2 and rest[1] == "cancel" and method == "POST":
        if not await ctx.jobs.cancel_batch(batch_id, int(time.time())):
            raise Conflict(f"Batch {batch_id} is {row['status']}; only a batch in progress can be cancelled",
                           code="batch_not_cancellable")
        fresh = await ctx.jobs.get_batch(batch_id)
        assert fresh is not None
        return _json(200, await ctx.lane.batch_view(fresh))
    raise NotFound(f"Unknown path /v1/batches/{'/'.join(rest)} ({method})", code="unknown_url")


def _metadata(value: Any) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or len(value) > 16 or not all(
            isinstance(k, str) and len(k) <= 64 and isinstance(v, str) and len(v) <= 512 for k, v in value.items()):
        raise BadRequest("'metadata' must be an object of at most 16 string keys (<= 64 chars) and string values "
                         "(<= 512 chars)", param="metadata", code="invalid_value")
    return value


async def _create(ctx: _Ctx, p: dict[str, Any], headers: dict[str, str]) -> Answer:
    key = ctx.creator()
    unknown = set(p) - {"input_file_id", "endpoint", "completion_window", "metadata"}
    if unknown:
        raise BadRequest(f"Unknown parameter(s): {', '.join(sorted(unknown))}", code="unknown_parameter")
    endpoint, window, file_id = p.get("endpoint"), p.get("completion_window", "24h"), p.get("input_file_id")
    if endpoint not in URLS:
        raise BadRequest(f"'endpoint' must be one of {', '.join(URLS)}, not {endpoint!r}", param="endpoint",
                         code="invalid_value")
    try:
        window_s = policy.duration_s(str(window))
    except ValueError as e:
        raise BadRequest(f"'completion_window': {e}", param="completion_window", code="invalid_value") from None
    meta = _metadata(p.get("metadata"))
    if not isinstance(file_id, str):
        raise BadRequest("Missing required parameter: 'input_file_id'", param="input_file_id",
                         code="missing_required_parameter")
    f = ctx.mine(await ctx.jobs.get_file(file_id), "file", file_id)
    if f["purpose"] != "batch":
        raise BadRequest(f"File {file_id} has purpose {f['purpose']!r}, not 'batch'", param="input_file_id",
                         code="invalid_value")
    lines = parse_jsonl(await ctx.jobs.file_content(file_id) or b"", ctx.lane.cfg.max_requests)
    known = set(ctx.app.targets) | set(ctx.app.groups)
    errors = []
    for ln in lines:
        model = ln.body["model"]
        if ln.url != endpoint:
            errors.append(f"line {ln.number}: url {ln.url} does not match the batch endpoint {endpoint}")
        elif model not in known:
            errors.append(f"line {ln.number}: unknown model {model!r}")
        elif key.models and model not in key.models:
            errors.append(f"line {ln.number}: this key may not use model {model!r}")
    if errors:
        more = f" (and {len(errors) - 20} more)" if len(errors) > 20 else ""
        raise BadRequest(f"Input file {file_id} does not fit this batch: {len(errors)} problem(s): "
                         + "; ".join(errors[:20]) + more, param="input_file_id", code="invalid_batch_file")
    now = time.time()
    batch_id = new_id("batch_")
    margin_headers = {k: v for k, v in kept_headers(headers).items() if k not in _RESERVED}
    forward = ctx.lane.forwarder.models if ctx.lane.forwarder is not None else frozenset()
    items = [{"item_id": new_id("batch_req_"), "batch_id": batch_id, "line": ln.number, "custom_id": ln.custom_id,
              "key_id": key.key_id, "endpoint": URLS[endpoint], "model": ln.body["model"],
              "body": orjson.dumps(ln.body).decode(),
              "headers": orjson.dumps({**margin_headers, "x-margin-tier": "batch",
                                       "x-request-id": f"{batch_id}:{ln.custom_id}"}).decode(),
              "status": "forward" if ln.body["model"] in forward else "queued", "reason": None, "attempts": 0,
              "runs": 0, "not_before": now, "expires_at": now + window_s, "lease_owner": None, "lease_until": None,
              "event_id": None, "request_id": f"{batch_id}:{ln.custom_id}", "response_status": None,
              "response_request_id": None, "response_body": None, "error_code": None, "error_message": None,
              "cost_usd": None, "saved_usd": None, "upstream_id": None, "holds": None, "created_at": now,
              "finished_at": None} for ln in lines]
    t = int(now)
    batch = {"batch_id": batch_id, "key_id": key.key_id, "endpoint": endpoint, "input_file_id": file_id,
             "completion_window": str(window), "status": "in_progress", "total": len(items), "created_at": t,
             "in_progress_at": t, "expires_at": t + window_s, "finalizing_at": None, "completed_at": None,
             "failed_at": None, "expired_at": None, "cancelling_at": None, "cancelled_at": None,
             "output_file_id": None, "error_file_id": None,
             "metadata": orjson.dumps(meta).decode() if meta is not None else None,
             "headers": orjson.dumps(margin_headers).decode()}
    await ctx.jobs.create_batch(batch, items)
    return _json(200, await ctx.lane.batch_view(batch))


async def _deferred(ctx: _Ctx, method: str, rest: list[str]) -> Answer:
    if not rest:
        raise NotFound("Poll a deferred request at /v1/deferred/{id}", code="unknown_url")
    job_id = rest[0]
    row = await ctx.jobs.get_item(job_id)
    row = ctx.mine(row if row is not None and row["batch_id"] is None else None, "deferred request", job_id)
    if len(rest) == 2 and rest[1] == "cancel" and method == "POST":
        if not await ctx.jobs.update_item(job_id, {"status": "cancelled", "finished_at": time.time(),
                                                   "error_code": "deferred_cancelled"}, "queued"):
            raise Conflict(f"Deferred request {job_id} has already started or ended", code="deferred_not_cancellable")
        row = {**row, "status": "cancelled"}
        return _json(200, deferred_view(row))
    if len(rest) != 1 or method != "GET":
        raise NotFound(f"Unknown path /v1/deferred/{'/'.join(rest)} ({method})", code="unknown_url")
    view = deferred_view(row)
    if row["status"] in ("done", "failed") and row.get("response_status"):
        return int(row["response_status"]), [*JSON, (b"x-margin-deferred-id", job_id.encode())], \
            str(row["response_body"]).encode()
    if row["status"] in ("expired", "cancelled", "failed"):
        what = {"expired": "expired before it could run", "cancelled": "was cancelled"}.get(row["status"], "failed")
        return _json(410, {"error": {"message": f"Deferred request {job_id} {what}", "type": "invalid_request_error",
                                     "param": None, "code": row.get("error_code") or f"deferred_{row['status']}"},
                           "deferred": view})
    return _json(202, view, [(b"retry-after", b"5")])
