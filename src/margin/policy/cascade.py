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
    """The first choice's token log-probabilities from an OpenAI-style chat or completion body."""
    choices = data.get("choices") or ()
    lp = choices[0].get("logprobs") if choices and isinstance(choices[0], dict) else None
    if not isinstance(lp, dict):
        return []
    if isinstance(lp.get("content"), list):  # chat
        return [float(t["logprob"]) for t in lp["content"] if isinstance(t, dict) and "logprob" in t]
    values = lp.get("token_logprobs")  # legacy completions
    return [float(v) for v in values if isinstance(v, int | float)] if isinstance(values, list) else []


def judge_messages(question: str, answer: str, instructions: str | None = None) -> list[dict[str, str]]:
    return [{"role": "system", "content": instructions or JUDGE_SYSTEM},
            {"role": "user", "content": f"Question:\n{question}\n\nAnswer:\n{answer}\n\nYES or NO?"}]


def judge_verdict(text: str) -> tuple[bool, str]:
    """A judge's reply: YES accepts; anything else (NO, a hedge, nothing) escalates."""
    word = re.sub(r"[^A-Za-z]", "", text.strip().split()[0]).upper() if text.strip() else ""
    return (True, "judge: YES") if word == "YES" else (False, f"judge said {text.strip()[:40]!r}")
