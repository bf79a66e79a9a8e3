"""Read token usage from an OpenAI-format response or final stream chunk (chat, completions,
embeddings and the Responses API)."""

from __future__ import annotations

from typing import Any

from margin.domain import Usage

_MAX = 2**31  # no call has more tokens; a larger value is garbage, not a bill


def _int(d: Any, key: str) -> int:
    if not isinstance(d, dict):
        return 0
    v = d.get(key)
    if isinstance(v, bool) or not isinstance(v, int | float) or v != v or v <= 0:
        return 0
    return min(int(v), _MAX)


def parse_usage(data: dict[str, Any]) -> Usage | None:
    """None when the upstream reported no usage (the caller then estimates and says so)."""
    u = data.get("usage")
    keys = ("prompt_tokens", "completion_tokens", "input_tokens", "output_tokens")
    if not isinstance(u, dict) or not any(k in u for k in keys):
        return None
    # Chat/completions name them prompt/completion; the Responses API input/output.
    pd = u.get("prompt_tokens_details") or u.get("input_tokens_details")
    cd = u.get("completion_tokens_details") or u.get("output_tokens_details")
    prompt = _int(u, "prompt_tokens") or _int(u, "input_tokens")
    completion = _int(u, "completion_tokens") or _int(u, "output_tokens")
    # OpenAI: cached_tokens; DeepSeek: prompt_cache_hit_tokens; Anthropic-style: cache_* fields.
    cached = _int(pd, "cached_tokens") or _int(u, "prompt_cache_hit_tokens") or _int(u, "cache_read_input_tokens")
    write = _int(pd, "cache_write_tokens") or _int(u, "cache_creation_input_tokens")
    if cached + write > prompt:
        # Anthropic-style accounting: the prompt count excludes cache reads and writes.
        prompt += cached + write
    reasoning = _int(cd, "reasoning_tokens")
    total = _int(u, "total_tokens")
    if reasoning and total - prompt - completion >= reasoning:
        # Some providers report reasoning outside completion_tokens; it is billed as output.
        completion += reasoning
    return Usage(input_tokens=prompt, output_tokens=completion, cached_input_tokens=cached,
                 cache_write_tokens=write, reasoning_tokens=reasoning, source="provider")
