"""Cascade verifiers: is the cheap model's answer good enough to return? Pure functions of the
answer text; a failed check escalates the call to the next, stronger model."""

from __future__ import annotations

import re

import orjson


def verify(text: str, regex: str | None, want_json: bool) -> tuple[bool, str]:
    """(accepted, why). Every configured check must pass; with none configured, empty answers fail."""
    if not text.strip():
        return False, "empty answer"
    if want_json:
        try:
            orjson.loads(text)
        except orjson.JSONDecodeError:
            return False, "answer is not valid JSON"
    if regex is not None and re.search(regex, text) is None:
        return False, f"answer does not match /{regex}/"
    return True, "verified"
