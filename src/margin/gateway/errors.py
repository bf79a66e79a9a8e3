"""Client-visible errors: one exception per kind, mapped once to the OpenAI error body."""

from __future__ import annotations

import orjson


class GatewayError(Exception):
    status = 500
    type = "api_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 status: int | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.headers = headers or {}

    def body(self) -> bytes:
        return orjson.dumps({"error": {"message": self.message, "type": self.type, "param": self.param,
                                       "code": self.code}})

    def stream_event(self, endpoint: str) -> bytes:
        """The error as the last event of a stream that broke: a Responses API stream has typed
        events (`error`); chat and completion streams an `{"error": ...}` data line."""
        if endpoint == "response":
            return b"event: error\ndata: " + orjson.dumps({"type": "error", "code": self.code,
                                                           "message": self.message, "param": self.param}) + b"\n\n"
        return b"data: " + self.body() + b"\n\n"


class BadRequest(GatewayError):
    status, type, code = 400, "invalid_request_error", "invalid_request"


class Unauthorized(GatewayError):
    status, type, code = 401, "invalid_request_error", "invalid_api_key"


class Forbidden(GatewayError):
    status, type, code = 403, "permission_error", "model_not_allowed"


class NotFound(GatewayError):
    status, type, code = 404, "invalid_request_error", "not_found"


class MethodNotAllowed(GatewayError):
    status, type, code = 405, "invalid_request_error", "method_not_allowed"


class PayloadTooLarge(GatewayError):
    status, type, code = 413, "invalid_request_error", "request_too_large"


class UpstreamFailed(GatewayError):
    """The provider failed: 502 for errors and resets, 504 for timeouts, or its own 4xx passed on."""

    status, type, code = 502, "upstream_error", "upstream_error"
    retryable = False  # worth another attempt (5xx, timeout, reset, 429)
    provider_fault = False  # counts against the provider's circuit breaker
    retry_after_s: float | None = None

    def transient(self, provider_fault: bool) -> UpstreamFailed:
        self.retryable, self.provider_fault = True, provider_fault
        return self


class ServerError(GatewayError):
    status, type, code = 500, "api_error", "internal_error"
