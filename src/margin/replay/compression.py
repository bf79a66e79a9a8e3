"""Context compression in a replay: the gateway's own `policy.compress.compress` on a request's
recorded messages, with the route's settings (`compress:` on the model or group asked for, as
gateway/compression.CompressLever builds the policy).

The trace's input tokens are scaled by the estimated compressed/original ratio rather than
replaced by the estimate: where the trace recorded the provider's count (a ledger export), the
estimator's bias cancels in the ratio and an untouched prompt keeps its exact count; where the
trace recorded only messages, its input tokens are the estimate, so the two coincide.

A summary by a cheap model (`summarise_with`) is a call of its own: its prompt is the gateway's
`summary_request` on the dropped turns (estimated tokens), its output is taken at its cap,
`summary_max_tokens` (the summary's real length is unknown: an upper bound), and the compressed
prompt then carries a summary of that many tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from margin import wiring
from margin.config import CompressConfig
from margin.policy import compress
from margin.pricing.tokens import count_messages


@dataclass(frozen=True, slots=True)
class Summary:
    model: str
    payload: dict[str, Any]  # what the gateway sends the summariser (its exact-cache key covers it)
    input_tokens: int  # estimated tokens of that prompt
    max_tokens: int
    after: int  # estimated tokens of the compressed prompt with the summary in it


@dataclass(frozen=True, slots=True)
class Squeeze:
    """What compression does to one request's messages (estimated tokens)."""

    before: int
    after: int  # without a summary
    summary: Summary | None  # the summariser call, where turns were dropped and the route summarises
    notes: tuple[str, ...]

    def sent(self, summarised: bool) -> int:
        """Estimated tokens of what goes upstream: the gateway sends the compressed prompt only if
        it is smaller than the original."""
        after = self.summary.after if summarised and self.summary is not None else self.after
        return after if self.notes and after < self.before else self.before


def policy_of(c: CompressConfig) -> compress.CompressPolicy:
    """The route's policy, as the gateway builds it."""
    return wiring.compress_policy(c)


def squeeze(messages: list[dict[str, Any]], settings: CompressConfig, policy: compress.CompressPolicy) -> Squeeze:
    c = compress.compress(messages, policy, count_messages)
    summary = None
    if c.notes and c.dropped and settings.summarise_with:
        request = compress.summary_request(c.dropped, settings.summary_max_tokens)
        payload = {"temperature": 0, "max_tokens": settings.summary_max_tokens, "messages": request}
        summary = Summary(settings.summarise_with, payload, count_messages(request), settings.summary_max_tokens,
                          count_messages(compress.with_summary(c, "")) + settings.summary_max_tokens)
    return Squeeze(c.tokens_before, c.tokens_after, summary, tuple(c.notes))


def scaled(recorded: int, before: int, after: int) -> int:
    """``recorded`` input tokens times after/before, rounded half up (integers: no float)."""
    if before <= 0 or after >= before:
        return recorded
    return (2 * recorded * after + before) // (2 * before)
