"""Cascade verifiers: is the cheap model's answer good enough to return? Pure functions of the
answer (and of a judge model's verdict, which the shell obtains); a failed check escalates the
call to the next, stronger model."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import orjson

JUDGE_SYSTEM = ("You grade answers strictly. Reply with exactly one word: YES if the answer is correct, "
                "complete and responsive to the question, otherwise NO.")


def verify(text: str, regex: str | None, want_json: bool, min_logprob: float | None = None,
           logprobs: Sequence[float] | None = None) -> tuple[bool, str]:
    """(accepted, why). Every configured check must pass; with none configured, empty answers fail.
    `min_logprob`: the mean token log-probability must reach it - checked only when the provider
    returned log-probabilities (`logprobs`), since not every provider can."""
    if not text.strip():
        return False, "empty answer"
    if want_json:
        try:
            orjson.loads(text)
        except orjson.JSONDecodeError:
            return False, "answer is not valid JSON"
    if regex is not None and re.search(regex, text) is None:
        return False, f"answer does not match /{regex}/"
    if min_logprob is not None and logprobs:
        mean = sum(logprobs) / len(logprobs)
        if mean < min_logprob:
            return False, f"mean token logprob {mean:.3f} < {min_logprob:g} (p={math.exp(mean):.2f})"
    return True, "verified"


def token_logprobs(data: dict[str, Any]) -> list[float]:
    """The first choice's token log-probabilities from an OpenAI-style chat or completion body, or
    a Responses API body's output text (asked for with include=message.output_text.logprobs)."""
    if data.get("object") == "response":
        return [float(t["logprob"]) for item in data.get("output") or () if isinstance(item, dict)
                for part in item.get("content") or () if isinstance(part, dict)
                for t in part.get("logprobs") or () if isinstance(t, dict) and "logprob" in t]
    choices = data.get("choices") or ()
    lp = choices[0].get("logprobs") if choices and isinstance(choices[0], dict) else None
    if not isinstance(lp, dict):
        return []
    if isinstance(lp.get("content"), list):  # chat
        return [float(t["logprob"]) for t in lp["content"] if isinstance(t, dict) and "logprob" in t]
    values = lp.get("token_logprobs")  # legacy completions
    return [float(v) for v in values if isinstance(v, int | float)] if isinstance(values, list) else []


_RESPONSE_LOGPROBS = "message.output_text.logprobs"


def ask_logprobs(endpoint: str, payload: dict[str, Any]) -> bool:
    """Make the upstream request return token log-probabilities; False if the client already asked."""
    if endpoint == "response":
        include = payload.get("include")
        include = include if isinstance(include, list) else []
        if _RESPONSE_LOGPROBS in include:
            return False
        payload["include"] = [*include, _RESPONSE_LOGPROBS]
        return True
    if "logprobs" in payload:
        return False
    payload["logprobs"] = True if endpoint == "chat" else 1
    return True


def without_logprobs(data: dict[str, Any]) -> dict[str, Any]:
    """An answer without the log-probabilities margin asked for only to verify it."""
    if data.get("object") == "response":
        return {**data, "output": [
            {**item, "content": [{k: v for k, v in part.items() if k != "logprobs"} if isinstance(part, dict)
                                 else part for part in item.get("content") or ()]}
            if isinstance(item, dict) and "content" in item else item for item in data.get("output") or ()]}
    return {**data, "choices": [{k: v for k, v in c.items() if k != "logprobs"} for c in data.get("choices") or ()]}


def judge_messages(question: str, answer: str, instructions: str | None = None) -> list[dict[str, str]]:
    return [{"role": "system", "content": instructions or JUDGE_SYSTEM},
            {"role": "user", "content": f"Question:\n{question}\n\nAnswer:\n{answer}\n\nYES or NO?"}]


def judge_verdict(text: str) -> tuple[bool, str]:
    """A judge's reply: YES accepts; anything else (NO, a hedge, nothing) escalates."""
    word = re.sub(r"[^A-Za-z]", "", text.strip().split()[0]).upper() if text.strip() else ""
    return (True, "judge: YES") if word == "YES" else (False, f"judge said {text.strip()[:40]!r}")
