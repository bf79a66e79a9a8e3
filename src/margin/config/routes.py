"""How requests are routed: model groups and their rules, cascades, compression and semantic-cache
settings per route, retries and circuit breakers."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from margin.config.base import Tier, _Strict


class CompressConfig(_Strict):
    """Context compression for a route (README "Context compression"): dedupe repeated tool outputs and
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
