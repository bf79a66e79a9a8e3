"""The one interface every upstream adapter implements, and the errors it may raise."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from margin.domain import Endpoint


@dataclass(frozen=True, slots=True)
class Reply:
    """A complete (non-streaming) upstream answer: raw bytes to forward, parsed JSON to meter."""

    status: int
    body: bytes
    data: dict[str, Any]
    meta: dict[str, Any] | None = None  # a ledger action from the provider (a pool's replica choice)


@dataclass(frozen=True, slots=True)
class Chunk:
    """One SSE event from a streaming upstream. `raw` is forwarded to the client byte for byte;
    `data` is the parsed JSON payload, or None for the `[DONE]` sentinel."""

    raw: bytes
    data: dict[str, Any] | None
    meta: dict[str, Any] | None = None  # on a stream's first chunk: a ledger action (a pool's replica choice)


class UpstreamError(Exception):
    """The upstream answered, but with an error status (4xx/5xx) or a body we cannot use."""

    def __init__(self, status: int, message: str, error_type: str = "upstream_error", body: bytes = b"",
                 retry_after_s: float | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type
        self.body = body
        self.retry_after_s = retry_after_s  # the upstream's Retry-After, when it sent one


class UpstreamTimeout(Exception):
    """No (complete) answer within the provider's timeout."""


class UpstreamConnectionError(Exception):
    """Could not connect, or the connection was reset before the answer was complete."""


class Provider(Protocol):
    """An upstream. `payload` is the client's JSON body with `model` already rewritten to the
    upstream id; adapters must not mutate it. `headers` are the client's request headers
    (lower-case names); an adapter forwards only those its config allows."""

    name: str
    kind: str

    async def send(
        self, endpoint: Endpoint, payload: dict[str, Any], headers: Mapping[str, str] | None = None
    ) -> Reply: ...

    def stream(
        self, endpoint: Endpoint, payload: dict[str, Any], headers: Mapping[str, str] | None = None
    ) -> AsyncIterator[Chunk]: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...
