"""Read token usage from an OpenAI-format response or final stream chunk."""

from __future__ import annotations

from typing import Any

from margin.domain import Usage


def _int(d: Any, key: str) -> int:
    if not isinstance(d, dict):
        return 0
    v = d.get(key)
    return int(v) if isinstance(v, int | float) and v > 0 else 0


def parse_usage(data: dict[str, Any]) -> Usage | None:
    """None when the upstream reported no usage (the caller then estimates and says so)."""
    u = data.get("usage")
    if not isinstance(u, dict) or ("prompt_tokens" not in u and "completion_tokens" not in u):
        return None
    pd, cd = u.get("prompt_tokens_details"), u.get("completion_tokens_details")
    return Usage(
        input_tokens=_int(u, "prompt_tokens"),
        output_tokens=_int(u, "completion_tokens"),
        # OpenAI: cached_tokens; DeepSeek-style: prompt_cache_hit_tokens; Anthropic-compatible: cache_*.
        cached_input_tokens=_int(pd, "cached_tokens")
        or _int(u, "prompt_cache_hit_tokens")
        or _int(u, "cache_read_input_tokens"),
        cache_write_tokens=_int(pd, "cache_write_tokens") or _int(u, "cache_creation_input_tokens"),
        reasoning_tokens=_int(cd, "reasoning_tokens"),
        source="provider",
    )
