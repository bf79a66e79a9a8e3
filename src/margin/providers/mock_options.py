"""What the simulated provider can be told: its options (`margin mock-upstream` flags) and the
per-request `X-Mock-*` headers that override them for one request."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class MockOptions:
    ttft_ms: float = 0.0
    tokens_per_s: float = 0.0
    output_tokens: int = 16
    usage: bool = True
    error_rate: float = 0.0
    timeout_rate: float = 0.0
    reset_rate: float = 0.0
    cached_fraction: float = 0.0
    reasoning_tokens: int = 0
    seed: int = 0
    models: str = ""
    answers: str = ""  # JSON {"model": "fixed answer text"}: e.g. a judge model that always says YES
    logprob: float = -0.2  # per-token logprob reported when a request asks for logprobs

    def __post_init__(self) -> None:
        for name in ("error_rate", "timeout_rate", "reset_rate", "cached_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be within [0, 1]")
        for name in ("ttft_ms", "tokens_per_s", "output_tokens", "reasoning_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")


@dataclass(slots=True)
class Overrides:
    """Per-request `X-Mock-*` header values; None means "use the options"."""

    status: int | None = None
    ttft_ms: float | None = None
    output_tokens: int | None = None
    usage: bool | None = None
    reset: bool = False
    hang: bool = False
    cached_tokens: int | None = None
    reasoning_tokens: int | None = None
    invalid_json: bool = False
    tokens_per_s: float | None = None
    tool_calls: int = 0
    logprob: float | None = None

    @classmethod
    def parse(cls, headers: list[tuple[bytes, bytes]]) -> Overrides | None:
        ov: Overrides | None = None
        for k, v in headers:
            if not k.startswith(b"x-mock-"):
                continue
            ov = ov or cls()
            name, val = k[7:], v.decode("latin-1").strip()
            with contextlib.suppress(ValueError):  # a malformed override is ignored, not fatal
                if name == b"status":
                    ov.status = int(val)
                elif name == b"ttft-ms":
                    ov.ttft_ms = float(val)
                elif name == b"output-tokens":
                    ov.output_tokens = int(val)
                elif name == b"usage":
                    ov.usage = val not in ("0", "false", "")
                elif name == b"reset":
                    ov.reset = val == "1"
                elif name == b"hang":
                    ov.hang = val == "1"
                elif name == b"cached-tokens":
                    ov.cached_tokens = int(val)
                elif name == b"reasoning-tokens":
                    ov.reasoning_tokens = int(val)
                elif name == b"invalid-json":
                    ov.invalid_json = val == "1"
                elif name == b"tokens-per-s":
                    ov.tokens_per_s = float(val)
                elif name == b"logprob":
                    ov.logprob = float(val)
                elif name == b"tool-calls":
                    ov.tool_calls = int(val)
        return ov


