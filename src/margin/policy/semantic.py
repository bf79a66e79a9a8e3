"""Semantic-cache decisions. Pure: what is embedded, which entries may match, whether to serve.

Only the *last user turn* is embedded. Everything else that can change the answer - the system
prompt, earlier turns, tools, the model after routing, sampling parameters, streaming - goes into a
context hash, and an entry can only match a request with the same tenant and the same context
hash. So "What is the capital of France?" can be answered from "what's France's capital" under the
same system prompt and model, never under another prompt, model, conversation or tenant.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from margin.domain import responses
from margin.policy.cache import not_in_key


@dataclass(frozen=True, slots=True)
class SemanticKey:
    """Where a request's answer may be looked up: tenant and context namespace, and the text to embed."""

    tenant: str
    context: str
    text: str


def last_user_text(payload: dict[str, Any], endpoint: str = "chat") -> str | None:
    """The last turn's text if it is a user turn of plain text (or text parts only), else None.

    Images, audio or files in the turn make it unsuitable: the embedding would not see them."""
    turns = responses.turns(endpoint, payload)
    if not turns:
        return None
    last = turns[-1]
    if not isinstance(last, dict) or last.get("role") != "user" or last.get("type", "message") != "message":
        return None
    content = last.get("content")
    if isinstance(content, str):
        text = content
    elif isinstance(content, list):
        parts = []
        for p in content:
            if not (isinstance(p, dict) and p.get("type") in ("text", "input_text") and isinstance(p.get("text"), str)):
                return None
            parts.append(p["text"])
        text = "\n".join(parts)
    else:
        return None
    text = text.strip()
    return text or None


def context_hash(endpoint: str, model: str, payload: dict[str, Any], tenant_id: str) -> str:
    """SHA-256 of everything but the last user turn's text (and fields that cannot change the answer)."""
    skip = not_in_key(endpoint)
    body = {k: v for k, v in payload.items() if k not in skip}
    field = "messages" if endpoint == "chat" else "input"
    turns = list(responses.turns(endpoint, body))
    if turns and isinstance(turns[-1], dict):
        turns[-1] = {**turns[-1], "content": None}
    body[field] = turns
    blob = json.dumps({"e": endpoint, "m": model, "t": tenant_id, "b": body}, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def key(endpoint: str, model: str, payload: dict[str, Any], tenant_id: str, max_chars: int) -> SemanticKey | None:
    """The lookup key, or None when the request is not a candidate for the semantic cache.

    Only chat and Responses API requests (each its own namespace: the endpoint is in the context
    hash); the last turn must be user text of at most `max_chars` characters (MiniLM reads 256 word
    pieces: two long prompts differing past that point would embed alike)."""
    if endpoint not in ("chat", "response"):
        return None
    text = last_user_text(payload, endpoint)
    if text is None or len(text) > max_chars:
        return None
    return SemanticKey(tenant_id, context_hash(endpoint, model, payload, tenant_id), text)


_WORDS = re.compile(r"\w+")


def same_words(a: str, b: str) -> bool:
    """The same words in the same order, ignoring case and punctuation: the same question, whatever
    a learned verifier (which never saw such pairs in training) makes of it."""
    return _WORDS.findall(a.lower()) == _WORDS.findall(b.lower())


def choose(scores: Sequence[float], threshold: float) -> int | None:
    """Index of the best-scored candidate if its score reaches the threshold (ties: the first,
    i.e. the nearest by cosine), else None."""
    if not scores:
        return None
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    return best if scores[best] >= threshold else None
