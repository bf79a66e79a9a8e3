"""A provider's own batch API, OpenAI style (`/files` + `/batches`), as margin's batch lane uses it:
upload a JSONL file, create a batch, poll it, download its output and error files. Also the
multipart/form-data parsing shared by margin's own `/v1/files` and the simulated provider."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from python_multipart import MultipartParser
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import parse_options_header

from margin.config import ProviderConfig
from margin.providers.base import UpstreamConnectionError, UpstreamError, UpstreamTimeout
from margin.providers.openai_http import error_message

TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})


class MultipartError(ValueError):
    """The body is not multipart/form-data, or cannot be parsed; the message says why."""


@dataclass(frozen=True, slots=True)
class Part:
    filename: str | None
    data: bytes


def parse_multipart(content_type: str | None, body: bytes) -> dict[str, Part]:
    """multipart/form-data -> {field name: Part} (python-multipart's streaming parser)."""
    ctype, opts = parse_options_header(content_type)
    if ctype != b"multipart/form-data" or b"boundary" not in opts:
        raise MultipartError("expected multipart/form-data with a boundary")
    parts: dict[str, Part] = {}
    headers: dict[bytes, bytes] = {}
    name: list[bytes] = []
    value: list[bytes] = []
    data: list[bytes] = []

    def on_header_end() -> None:
        headers[b"".join(name).lower()] = b"".join(value)
        name.clear()
        value.clear()

    def on_part_end() -> None:
        _, disp = parse_options_header(headers.get(b"content-disposition"))
        filename = disp.get(b"filename")
        parts[disp.get(b"name", b"").decode("utf-8", "replace")] = Part(
            filename.decode("utf-8", "replace") if filename is not None else None, b"".join(data))
        headers.clear()
        data.clear()

    parser = MultipartParser(opts[b"boundary"], {
        "on_header_field": lambda b, s, e: name.append(b[s:e]),
        "on_header_value": lambda b, s, e: value.append(b[s:e]),
        "on_header_end": on_header_end,
        "on_part_data": lambda b, s, e: data.append(b[s:e]),
        "on_part_end": on_part_end})
    try:
        parser.write(body)
        parser.finalize()
    except FormParserError as e:
        raise MultipartError(str(e)) from None
    return parts


class BatchClient:
    def __init__(self, cfg: ProviderConfig):
        assert cfg.base_url is not None
        self.name = cfg.name
        self.base = cfg.base_url.rstrip("/")
        self._auth = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
        self._timeout = aiohttp.ClientTimeout(total=max(60.0, cfg.timeout_s), connect=cfg.connect_timeout_s)
        self._session: aiohttp.ClientSession | None = None

    def _s(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout, headers=self._auth)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _call(self, method: str, path: str, **kw: Any) -> bytes:
        try:
            async with self._s().request(method, self.base + path, **kw) as r:
                body = await r.read()
                if r.status >= 400:
                    message, kind = error_message(r.status, body)
                    raise UpstreamError(r.status, f"{self.name} {method} {path}: {message}", kind or "upstream_error",
                                        body)
                return body
        except TimeoutError as e:
            raise UpstreamTimeout(f"{self.name} {method} {path}: timed out") from e
        except aiohttp.ClientError as e:
            raise UpstreamConnectionError(f"{self.name} {method} {path}: {e}") from e

    async def _json(self, method: str, path: str, **kw: Any) -> dict[str, Any]:
        data = orjson.loads(await self._call(method, path, **kw))
        if not isinstance(data, dict):
            raise UpstreamError(502, f"{self.name} {path}: expected a JSON object", "invalid_upstream_response")
        return data

    async def upload(self, filename: str, content: bytes) -> str:
        form = aiohttp.FormData()
        form.add_field("purpose", "batch")
        form.add_field("file", content, filename=filename, content_type="application/jsonl")
        return str((await self._json("POST", "/files", data=form))["id"])

    async def create(self, file_id: str, endpoint: str, window: str, metadata: dict[str, str]) -> dict[str, Any]:
        return await self._json("POST", "/batches", json={"input_file_id": file_id, "endpoint": endpoint,
                                                          "completion_window": window, "metadata": metadata})

    async def retrieve(self, batch_id: str) -> dict[str, Any]:
        return await self._json("GET", f"/batches/{batch_id}")

    async def cancel(self, batch_id: str) -> dict[str, Any]:
        return await self._json("POST", f"/batches/{batch_id}/cancel")

    async def find(self, key: str, value: str, pages: int = 5) -> dict[str, Any] | None:
        """The batch whose metadata has key=value among the most recent ones (a submission
        interrupted after `create` is found again instead of submitted twice)."""
        after: str | None = None
        for _ in range(pages):
            page = await self._json("GET", "/batches", params={"limit": "100", **({"after": after} if after else {})})
            for b in page.get("data") or ():
                if isinstance(b, dict) and (b.get("metadata") or {}).get(key) == value:
                    return b
            if not page.get("has_more") or not page.get("data"):
                return None
            after = str(page["data"][-1]["id"])
        return None

    async def content(self, file_id: str) -> bytes:
        return await self._call("GET", f"/files/{file_id}/content")


def results(*files: bytes) -> dict[str, tuple[int, bytes]]:
    """custom_id -> (HTTP status, body JSON bytes) from output/error files; a line with no
    response (e.g. expired upstream) maps to status 0 and its error object."""
    out: dict[str, tuple[int, bytes]] = {}
    for content in files:
        for raw in content.splitlines():
            if not raw.strip():
                continue
            line = orjson.loads(raw)
            resp = line.get("response")
            if isinstance(resp, dict):
                out[str(line.get("custom_id"))] = (int(resp.get("status_code") or 0), orjson.dumps(resp.get("body")))
            else:
                out[str(line.get("custom_id"))] = (0, orjson.dumps({"error": line.get("error")}))
    return out
