"""Any OpenAI-compatible upstream over HTTP: one pooled aiohttp session per provider."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
import orjson

from margin.config import ProviderConfig
from margin.domain import Endpoint
from margin.domain.responses import ENDING_EVENTS
from margin.providers.base import Chunk, Reply, UpstreamConnectionError, UpstreamError, UpstreamTimeout

PATHS: dict[str, str] = {
    "chat": "/chat/completions",
    "completion": "/completions",
    "embedding": "/embeddings",
    "response": "/responses",
}
_DONE = b"[DONE]"


def error_message(status: int, body: bytes) -> tuple[str, str]:
    """The upstream's own error message and type when it sent an OpenAI error body."""
    try:
        err = orjson.loads(body).get("error")
        if isinstance(err, dict):
            return str(err.get("message") or f"upstream returned HTTP {status}"), str(err.get("type") or "")
        if isinstance(err, str):
            return err, ""
    except (orjson.JSONDecodeError, AttributeError):
        pass
    snippet = body[:200].decode(errors="replace").strip()
    return f"upstream returned HTTP {status}" + (f": {snippet}" if snippet else ""), ""


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None  # an HTTP date: treat as no hint


class OpenAIHTTPProvider:
    kind = "openai"

    def __init__(self, cfg: ProviderConfig):
        assert cfg.base_url is not None
        self.name = cfg.name
        self.cfg = cfg
        self.base = cfg.base_url.rstrip("/")
        self._headers = {"Content-Type": "application/json"}
        if cfg.api_key:
            self._headers["Authorization"] = f"Bearer {cfg.api_key}"
        self._session: aiohttp.ClientSession | None = None
        names = [h.lower() for h in cfg.forward_headers]
        self._fwd_exact = frozenset(n for n in names if not n.endswith("*"))
        self._fwd_prefixes = tuple(n[:-1] for n in names if n.endswith("*"))

    def _forwarded(self, headers: Mapping[str, str] | None) -> dict[str, str] | None:
        if not headers or not (self._fwd_exact or self._fwd_prefixes):
            return None
        return {k: v for k, v in headers.items() if k in self._fwd_exact or k.startswith(self._fwd_prefixes)}

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=self.cfg.max_connections, keepalive_timeout=60, ttl_dns_cache=300
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            headers=self._headers,
            json_serialize=lambda o: orjson.dumps(o).decode(),
            auto_decompress=True,
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _timeout(self, stream: bool) -> aiohttp.ClientTimeout:
        c = self.cfg
        # Streams may run long; what must not happen is a long silence between chunks.
        if stream:
            # `connect` also bounds the wait for a free pooled connection.
            return aiohttp.ClientTimeout(total=None, connect=c.connect_timeout_s + 30,
                                         sock_connect=c.connect_timeout_s, sock_read=c.timeout_s)
        return aiohttp.ClientTimeout(total=c.timeout_s, sock_connect=c.connect_timeout_s)

    def _session_or_fail(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise UpstreamConnectionError(f"provider {self.name} is not started")
        return self._session

    async def send(
        self, endpoint: Endpoint, payload: dict[str, Any], headers: Mapping[str, str] | None = None
    ) -> Reply:
        url = self.base + PATHS[endpoint]
        try:
            async with self._session_or_fail().post(
                url,
                data=orjson.dumps(payload),
                timeout=self._timeout(False),
                headers=self._forwarded(headers),
            ) as resp:
                body = await resp.read()
                status = resp.status
                retry_after = _retry_after(resp.headers.get("Retry-After"))
        except TimeoutError:
            raise UpstreamTimeout(f"{self.name}: no answer within {self.cfg.timeout_s:g} s") from None
        except aiohttp.ClientError as e:
            raise UpstreamConnectionError(f"{self.name}: {type(e).__name__}: {e}") from None
        if status >= 400:
            msg, etype = error_message(status, body)
            raise UpstreamError(status, self._redact(msg), etype or "upstream_error", body, retry_after)
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise UpstreamError(
                502, f"{self.name} returned a body that is not JSON", "invalid_upstream_response", body
            ) from None
        if not isinstance(data, dict):
            raise UpstreamError(
                502, f"{self.name} returned JSON that is not an object", "invalid_upstream_response"
            )
        return Reply(status, body, data)

    def _redact(self, message: str) -> str:
        """Some upstreams quote the credential they were sent in their error messages; margin's
        provider key must never reach a client or a log line."""
        key = self.cfg.api_key
        return message.replace(key, "[REDACTED]") if key and len(key) >= 8 else message

    async def stream(
        self, endpoint: Endpoint, payload: dict[str, Any], headers: Mapping[str, str] | None = None
    ) -> AsyncIterator[Chunk]:
        url = self.base + PATHS[endpoint]
        try:
            async with self._session_or_fail().post(
                url, data=orjson.dumps(payload), timeout=self._timeout(True), headers=self._forwarded(headers)
            ) as resp:
                if resp.status >= 400:
                    body = await resp.read()
                    msg, etype = error_message(resp.status, body)
                    raise UpstreamError(resp.status, self._redact(msg), etype or "upstream_error", body,
                                        _retry_after(resp.headers.get("Retry-After")))
                done = False
                data_lines: list[bytes] = []
                name = b""
                async for line in resp.content:
                    line = line.rstrip(b"\r\n")
                    if line.startswith(b"data:"):
                        data_lines.append(line[5:].lstrip(b" "))
                        continue
                    if line.startswith(b"event:"):
                        name = line + b"\n"  # the Responses API names its events: forwarded as sent
                        continue
                    if line or not data_lines:
                        continue  # `id:`/comment lines, or a blank line with no event
                    # A blank line ends the event; its data lines join with newlines (SSE spec).
                    data, data_lines = b"\n".join(data_lines).strip(), []
                    named, name = name, b""
                    if not data:
                        continue  # an empty keep-alive event
                    if data == _DONE:
                        done = True
                        yield Chunk(b"data: [DONE]\n\n", None)
                        break
                    try:
                        parsed = orjson.loads(data)
                    except orjson.JSONDecodeError:
                        raise UpstreamError(502, f"{self.name} streamed an event that is not JSON",
                                            "invalid_upstream_response") from None
                    yield Chunk(named + b"data: " + data.replace(b"\n", b"") + b"\n\n", parsed)
                    if endpoint == "response" and isinstance(parsed, dict) and parsed.get("type") in ENDING_EVENTS:
                        done = True  # a response stream ends with its terminal event, not [DONE]
                        yield Chunk(b"", None)
                        break
                if not done:
                    raise UpstreamConnectionError(f"{self.name}: stream ended before [DONE]")
        except TimeoutError:
            raise UpstreamTimeout(f"{self.name}: stream silent for {self.cfg.timeout_s:g} s") from None
        except aiohttp.ClientError as e:
            raise UpstreamConnectionError(f"{self.name}: {type(e).__name__}: {e}") from None
