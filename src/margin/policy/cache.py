"""Exact-cache decisions. Pure: which requests may be cached, and under which key.

The key covers everything that changes the answer - the model *after* routing, the messages,
tools and sampling parameters, whether and how it streams - and the tenant, so no tenant can ever
read another's entries. Fields that cannot change the answer (user ids, metadata) are left out."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from margin.domain import Attribution

_NOT_IN_KEY = frozenset({"model", "user", "metadata", "store", "service_tier", "prompt_cache_key"})
# A Responses answer's id can be chained on (previous_response_id) only if the provider stored it,
# so whether it was stored is part of what a Responses request gets back.
_NOT_IN_RESPONSE_KEY = _NOT_IN_KEY - {"store"}


def not_in_key(endpoint: str) -> frozenset[str]:
    return _NOT_IN_RESPONSE_KEY if endpoint == "response" else _NOT_IN_KEY


def tenant(a: Attribution, scope: str) -> str:
    """org (default), team or key: the widest group of callers allowed to share entries."""
    # JSON-encoded, so no choice of names can make two tenants spell the same ("a/b"+"c" vs "a"+"b/c").
    if scope == "key":
        return json.dumps(["key", a.key_id])
    if scope == "team":
        return json.dumps(["team", a.org, a.team])
    return json.dumps(["org", a.org])


def cacheable(payload: dict[str, Any], allow_nondeterministic: bool) -> bool:
    """Sampling at temperature > 0 gives a different answer each time (OpenAI's default is 1):
    such requests are cached only where the route says repeated answers are acceptable."""
    temperature = payload.get("temperature", 1.0)
    deterministic = isinstance(temperature, int | float) and temperature == 0
    return deterministic or allow_nondeterministic


def cache_key(endpoint: str, model: str, payload: dict[str, Any], tenant_id: str) -> str:
    skip = not_in_key(endpoint)
    body = {k: v for k, v in payload.items() if k not in skip}
    blob = json.dumps({"e": endpoint, "m": model, "t": tenant_id, "b": body}, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def directives(cache_control: str) -> tuple[bool, bool]:
    """(may read, may write) from a Cache-Control request header."""
    parts = {p.strip().lower() for p in cache_control.split(",") if p.strip()}
    if "no-store" in parts:
        return False, False
    return "no-cache" not in parts, True
