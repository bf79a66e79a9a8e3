"""Upstream adapters behind one interface (base.Provider)."""

from __future__ import annotations

from margin.config import POOL_KINDS, ProviderConfig
from margin.providers.base import (
    Chunk,
    Provider,
    Reply,
    UpstreamConnectionError,
    UpstreamError,
    UpstreamTimeout,
)


def make_provider(cfg: ProviderConfig) -> Provider:
    if cfg.kind == "openai":
        from margin.providers.openai_http import OpenAIHTTPProvider

        return with_responses(cfg, OpenAIHTTPProvider(cfg))
    if cfg.kind in POOL_KINDS:  # self-hosted replicas, load-aware (docs/selfhosted.md)
        from margin.providers.pool import PoolProvider

        return PoolProvider(cfg)  # each replica answers /v1/responses as `with_responses` says
    from margin.providers.llamacpp import LlamaCppProvider  # optional extra margin[local]

    return with_responses(cfg, LlamaCppProvider(cfg))


def with_responses(cfg: ProviderConfig, provider: Provider) -> Provider:
    """The provider, answering /v1/responses itself or through chat completions (cfg.responses_api)."""
    if cfg.responses_native:
        return provider
    from margin.providers.responses_via_chat import ResponsesViaChat

    return ResponsesViaChat(provider)


__all__ = [
    "Chunk",
    "Provider",
    "Reply",
    "UpstreamConnectionError",
    "UpstreamError",
    "UpstreamTimeout",
    "make_provider",
    "with_responses",
]
