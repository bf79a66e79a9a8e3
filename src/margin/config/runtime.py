"""How the gateway runs: ledger, telemetry, limits, caches and the batch lane."""

from __future__ import annotations

import re
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, model_validator

from margin.config.base import _Strict


class LedgerConfig(_Strict):
    url: str = "sqlite:///margin.db"
    spool_dir: str = ".margin/spool"
    batch_size: int = Field(default=500, ge=1)
    flush_interval_ms: int = Field(default=50, ge=1)
    queue_size: int = Field(default=20000, ge=1)
    retry_interval_s: float = Field(default=1.0, gt=0)


class TelemetryConfig(_Strict):
    otlp_endpoint: str | None = None
    service_name: str = "margin"


class LimitsConfig(_Strict):
    max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)


class CacheConfig(_Strict):
    enabled: bool = False
    backend: str = "memory"  # or a redis:// URL shared by replicas
    ttl_s: float = Field(default=3600, gt=0)
    max_entries: int = Field(default=10_000, ge=1)  # memory backend; Redis bounds entries by TTL
    scope: Literal["org", "team", "key"] = "org"  # who may share entries
    allow_nondeterministic: bool = False  # cache temperature > 0 answers too


class SemanticCacheConfig(_Strict):
    """Settings shared by every route with `semantic_cache` (docs/caching.md)."""

    # "memory": each replica's own entries; a redis:// URL: entries shared by replicas (one stream)
    backend: str = "memory"

    embedder: Literal["onnx", "torch"] = "onnx"  # all-MiniLM-L6-v2 on ONNX Runtime (exported once) or torch
    onnx_path: str = ".margin/models/all-MiniLM-L6-v2.onnx"  # exported here on first use if missing
    threads: int = Field(default=1, ge=1)  # embedding threads (one worker; the event loop keeps its core)
    ttl_s: float = Field(default=3600, gt=0)
    max_entries: int = Field(default=100_000, ge=1)
    max_entries_per_tenant: int = Field(default=10_000, ge=1)
    scope: Literal["org", "team", "key"] = "org"  # who may share entries
    allow_nondeterministic: bool = False  # cache temperature > 0 answers too
    max_text_chars: int = Field(default=1000, ge=1)  # longer last turns are not embedded (MiniLM reads 256 pieces)
    max_pending: int = Field(default=32, ge=1)  # lookups waiting for the embedder beyond this are skipped


_WINDOW = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-4]):([0-5]\d)$")


class BatchLaneConfig(_Strict):
    """The batch lane (docs/batch.md): OpenAI-style /v1/files + /v1/batches and deferred requests,
    run by a worker in every replica within `windows` and its own rate limits."""

    enabled: bool = False
    windows: list[str] = Field(default_factory=list)  # "22:00-06:00" in `timezone`; empty: always open
    timezone: str = "UTC"
    max_concurrency: int = Field(default=8, ge=1)  # items in flight per replica
    requests_per_minute: int = Field(default=0, ge=0)  # per replica; 0: no limit beyond budgets' own
    # X-Margin-Priority: low -> 202 + job id: never, only while the window is shut, or always.
    defer_low_priority: Literal["never", "outside_window", "always"] = "outside_window"
    deferred_window: str = Field(default="24h", pattern=r"^\d+[mh]$")  # a deferred request expires after
    max_attempts: int = Field(default=5, ge=1)  # runs that failed transiently (5xx, timeouts) before giving up
    lease_s: float = Field(default=60.0, gt=0)  # a dead replica's items are taken over after this
    poll_interval_s: float = Field(default=0.5, gt=0)
    provider_poll_s: float = Field(default=30.0, gt=0)  # how often a provider batch is polled
    max_file_bytes: int = Field(default=200 * 1024 * 1024, ge=1024)
    max_requests: int = Field(default=50_000, ge=1)  # per batch file (OpenAI's limit)

    @model_validator(mode="after")
    def _check(self) -> BatchLaneConfig:
        for w in self.windows:
            if not _WINDOW.match(w):
                raise ValueError(f"batch_lane window {w!r} is not HH:MM-HH:MM (24 h clock, e.g. 22:00-06:00)")
        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"batch_lane: unknown time zone {self.timezone!r}") from None
        return self
