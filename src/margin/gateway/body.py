"""Reading an ASGI request body within a size limit (the API's max_body, the batch lane's file limit)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from margin.gateway.errors import PayloadTooLarge

Receive = Callable[[], Awaitable[dict[str, Any]]]


async def read_body(receive: Receive, headers: dict[str, str], limit: int) -> bytes:
    """The whole body, refused as soon as it is known to exceed `limit`: by its declared length
    before reading, else as the parts arrive (a chunked upload need not declare one)."""
    declared = headers.get("content-length")
    if declared and declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"Request body of {declared} bytes exceeds the limit of {limit} bytes")
    parts: list[bytes] = []
    size = 0
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise ConnectionAbortedError("client went away while sending the body")
        part = msg.get("body", b"")
        size += len(part)
        if size > limit:
            raise PayloadTooLarge(f"Request body exceeds the limit of {limit} bytes")
        parts.append(part)
        if not msg.get("more_body"):
            return parts[0] if len(parts) == 1 else b"".join(parts)
