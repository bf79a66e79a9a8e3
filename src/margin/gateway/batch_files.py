"""Batch input files and what the lane answers with, in OpenAI's shapes: multipart upload
parsing, line-by-line JSONL validation with precise errors, file/batch objects, and the output
and error files (one JSON line per request: custom_id, response {status_code, request_id, body},
error)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
import uuid_utils

from margin.domain import Endpoint
from margin.gateway.errors import BadRequest, GatewayError
from margin.gateway.request import _check_fields
from margin.ledger.schema import Row
from margin.providers.openai_batch import MultipartError, Part
from margin.providers.openai_batch import parse_multipart as _parse_multipart

URLS: dict[str, Endpoint] = {"/v1/chat/completions": "chat", "/v1/completions": "completion",
                             "/v1/embeddings": "embedding", "/v1/responses": "response"}
PATH_OF: dict[str, str] = {v: k for k, v in URLS.items()}
MAX_CUSTOM_ID = 512
MAX_REPORTED = 20  # errors listed in one message; the count says how many there were


def new_id(prefix: str) -> str:
    """Time-ordered (uuid7), so listing newest-first is ordering by id."""
    return prefix + uuid_utils.uuid7().hex


def parse_multipart(content_type: str | None, body: bytes) -> dict[str, Part]:
    """multipart/form-data -> {field name: Part}, or a 400 saying what is wrong."""
    try:
        return _parse_multipart(content_type, body)
    except MultipartError as e:
        raise BadRequest(f"Upload the file as multipart/form-data with fields 'purpose' and 'file' ({e})",
                         code="invalid_multipart") from None


@dataclass(frozen=True, slots=True)
class Line:
    number: int  # 1-based line of the file
    custom_id: str
    url: str
    body: dict[str, Any]


def _line_error(n: int, raw: bytes, seen: dict[str, int]) -> tuple[Line | None, str | None]:
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        return None, f"line {n}: not valid JSON ({e})"
    if not isinstance(obj, dict):
        return None, f"line {n}: expected a JSON object, not {type(obj).__name__}"
    unknown = set(obj) - {"custom_id", "method", "url", "body"}
    if unknown:
        return None, f"line {n}: unknown field(s) {', '.join(sorted(unknown))}"
    cid, method, url, body = obj.get("custom_id"), obj.get("method"), obj.get("url"), obj.get("body")
    if not isinstance(cid, str) or not cid:
        return None, f"line {n}: 'custom_id' must be a non-empty string"
    if len(cid) > MAX_CUSTOM_ID:
        return None, f"line {n}: 'custom_id' is longer than {MAX_CUSTOM_ID} characters"
    if cid in seen:
        return None, f"line {n}: custom_id {cid!r} repeats line {seen[cid]} (custom_id must be unique in a file)"
    seen[cid] = n
    if method != "POST":
        return None, f"line {n}: 'method' must be \"POST\", not {method!r}"
    if url not in URLS:
        return None, f"line {n}: 'url' {url!r} is not one of {', '.join(URLS)}"
    if not isinstance(body, dict):
        return None, f"line {n}: 'body' must be a JSON object (the request for {url})"
    if body.get("stream") is True:
        return None, f"line {n}: 'body.stream' must not be true in a batch"
    try:
        _check_fields(URLS[url], body)
    except GatewayError as e:
        return None, f"line {n}: body: {e.message}"
    return Line(n, cid, url, body), None


def parse_jsonl(data: bytes, max_requests: int) -> list[Line]:
    """Every line checked; all problems reported at once (up to MAX_REPORTED), each with its line."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRequest(f"The file is not UTF-8 text (byte {e.start})", param="file", code="invalid_file") from None
    lines: list[Line] = []
    errors: list[str] = []
    seen: dict[str, int] = {}
    for i, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue  # blank lines (e.g. the trailing newline) carry no request
        line, err = _line_error(i, raw, seen)
        if err:
            errors.append(err)
        elif line:
            lines.append(line)
    if not lines and not errors:
        errors.append("the file holds no requests")
    if len(lines) + len(errors) > max_requests:
        errors.insert(0, f"the file holds {len(lines) + len(errors)} requests; at most {max_requests} per batch")
    if errors:
        more = f" (and {len(errors) - MAX_REPORTED} more)" if len(errors) > MAX_REPORTED else ""
        raise BadRequest(f"Invalid batch file: {len(errors)} problem(s): " + "; ".join(errors[:MAX_REPORTED]) + more,
                         param="file", code="invalid_batch_file")
    return lines


def file_object(row: Row) -> dict[str, Any]:
    return {"id": row["file_id"], "object": "file", "bytes": int(row["bytes"]), "created_at": int(row["created_at"]),
            "filename": row["filename"], "purpose": row["purpose"], "status": "processed", "expires_at": None,
            "status_details": None}


def batch_object(row: Row, counts: dict[str, int]) -> dict[str, Any]:
    failed = sum(counts.get(s, 0) for s in ("failed", "expired", "cancelled"))
    ts = {k: (int(row[k]) if row.get(k) is not None else None) for k in (
        "created_at", "in_progress_at", "expires_at", "finalizing_at", "completed_at", "failed_at", "expired_at",
        "cancelling_at", "cancelled_at")}
    return {
        "id": row["batch_id"], "object": "batch", "endpoint": row["endpoint"], "errors": None,
        "input_file_id": row["input_file_id"], "completion_window": row["completion_window"],
        "status": row["status"], "output_file_id": row.get("output_file_id"), "error_file_id": row.get("error_file_id"),
        **ts,
        "request_counts": {"total": int(row["total"]), "completed": counts.get("done", 0), "failed": failed},
        "metadata": orjson.loads(row["metadata"]) if row.get("metadata") else None,
        # margin's own detail: where the items are now (OpenAI clients ignore unknown fields)
        "margin": {"queued": counts.get("queued", 0) + counts.get("forward", 0), "running": counts.get("running", 0),
                   "at_provider": counts.get("upstream", 0)},
    }


_FINAL_ERRORS = {
    "expired": ("batch_expired", "This request could not be executed before the completion window expired."),
    "cancelled": ("batch_cancelled", "This request was not executed because the batch was cancelled."),
}


def output_line(item: Row) -> tuple[str, bytes]:
    """("output" | "error", the JSON line) for one finished item."""
    head = {"id": item["item_id"], "custom_id": item["custom_id"]}
    status = item["status"]
    if status in _FINAL_ERRORS:
        code, message = _FINAL_ERRORS[status]
        return "error", orjson.dumps({**head, "response": None, "error": {"code": code, "message": message}})
    status_code = int(item.get("response_status") or 0)
    if not status_code:
        err = {"code": item.get("error_code") or "failed", "message": item.get("error_message") or "no answer"}
        return "error", orjson.dumps({**head, "response": None, "error": err})
    body = item.get("response_body") or "null"
    line = b'{"id":%s,"custom_id":%s,"response":{"status_code":%d,"request_id":%s,"body":%s},"error":null}' % (
        orjson.dumps(item["item_id"]), orjson.dumps(item["custom_id"]), status_code,
        orjson.dumps(item.get("response_request_id") or ""), body.encode())
    return ("output" if 200 <= status_code < 300 else "error"), line


def result_files(batch: Row, items: list[Row], now: int) -> dict[str, Row]:
    """The output and error files of a finished batch (a file only if it has lines)."""
    out: dict[str, list[bytes]] = {"output": [], "error": []}
    for it in items:
        kind, line = output_line(it)
        out[kind].append(line)
    files: dict[str, Row] = {}
    for kind, lines in out.items():
        if not lines:
            continue
        content = b"\n".join(lines) + b"\n"
        files[kind] = {"file_id": new_id("file-"), "key_id": batch["key_id"],
                       "purpose": "batch_output", "filename": f"{batch['batch_id']}_{kind}.jsonl",
                       "bytes": len(content), "lines": len(lines), "created_at": now, "batch_id": batch["batch_id"],
                       "content": content}
    return files
