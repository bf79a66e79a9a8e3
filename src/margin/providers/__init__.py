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

        return OpenAIHTTPProvider(cfg)
    if cfg.kind in POOL_KINDS:  # self-hosted replicas, load-aware (docs/selfhosted.md)
        from margin.providers.pool import PoolProvider

        return PoolProvider(cfg)
    from margin.providers.llamacpp import LlamaCppProvider  # optional extra margin[local]

    provider: Provider = LlamaCppProvider(cfg)
    return provider


__all__ = [
    "Chunk",
    "Provider",
    "Reply",
    "UpstreamConnectionError",
    "UpstreamError",
    "UpstreamTimeout",
    "make_provider",
]
