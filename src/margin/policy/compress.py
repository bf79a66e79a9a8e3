"""Context compression. Pure: a chat's messages and the route's settings in, a smaller list of
messages (and what was dropped, for an optional summary) out. The gateway and replay call this.

Three steps, cheapest first:
1. a tool output identical to an earlier one is replaced by a pointer to it (agents re-read the
   same file or page again and again);
2. a long paragraph repeated from an earlier message (a pasted disclaimer, a re-sent document) is
   replaced by a marker;
3. if the prompt is still over the token budget, the oldest turns are dropped, keeping every
   leading system message and the newest turn.

Providers cache prompt prefixes (OpenAI, Anthropic, DeepSeek, vLLM), and a cached prefix is billed
at a fraction of the price, so compression must not churn the prefix on every call:
- steps 1 and 2 rewrite a message using only what came before it, so a conversation's rewritten
  prefix is the same on every later call;
- step 3 drops turns in blocks of `block` turns (a fixed grid): successive calls of one
  conversation keep the same cut, and so the same prefix, until the next block must go.
Messages are never edited in place: the caller's list is left as it was."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

Message = dict[str, Any]
Counter = Callable[[list[Message]], int]


@dataclass(frozen=True, slots=True)
class CompressPolicy:
    max_input_tokens: int | None = None  # drop old turns while the prompt is over this
    dedupe_tool_outputs: bool = True
    dedupe_paragraphs: bool = True
    min_paragraph_chars: int = 200  # shorter repeats are cheap and often meaningful ("ok", "yes")
    block: int = 4  # turns dropped at a time (prefix stability)
    summarise: bool = False  # the shell asks a cheap model to summarise what was dropped


@dataclass(slots=True)
class Compressed:
    messages: list[Message]
    tokens_before: int
    tokens_after: int
    dropped: list[Message] = field(default_factory=list)  # whole turns removed by step 3, in order
    notes: list[str] = field(default_factory=list)

    @property
    def tokens_saved(self) -> int:
        return max(0, self.tokens_before - self.tokens_after)


def _lead(messages: Sequence[Message]) -> int:
    """How many leading system/developer messages there are (always kept verbatim)."""
    n = 0
    while n < len(messages) and messages[n].get("role") in ("system", "developer"):
        n += 1
    return n


def _turns(messages: Sequence[Message]) -> list[list[Message]]:
    """Split into turns: a turn starts at each user or assistant message; tool results stay with
    the assistant message that called them, so dropping a turn never orphans a tool call."""
    turns: list[list[Message]] = []
    for m in messages:
        if m.get("role") in ("user", "assistant") or not turns:
            turns.append([m])
        else:
            turns[-1].append(m)
    return turns


def _dedupe_tools(messages: list[Message], last: int) -> int:
    first_id: dict[str, str] = {}
    n = 0
    for i, m in enumerate(messages[:last]):
        c = m.get("content")
        if m.get("role") != "tool" or not isinstance(c, str) or len(c) < 32:
            continue
        if c in first_id:
            messages[i] = {**m, "content": f"[identical to the output of tool call {first_id[c]} above]"}
            n += 1
        else:
            first_id[c] = str(m.get("tool_call_id") or "earlier")
    return n


def _dedupe_paragraphs(messages: list[Message], start: int, last: int, min_chars: int) -> int:
    seen: set[str] = set()
    n = 0
    for i in range(start, last):
        m = messages[i]
        c = m.get("content")
        if not isinstance(c, str) or len(c) < min_chars:
            continue
        kept: list[str] = []
        changed = False
        for para in c.split("\n\n"):
            key = para.strip()
            if len(key) >= min_chars and key in seen:
                kept.append("[repeated text omitted]")
                changed = True
            else:
                kept.append(para)
                if len(key) >= min_chars:
                    seen.add(key)
        if changed:
            messages[i] = {**m, "content": "\n\n".join(kept)}
            n += 1
    return n


def compress(messages: Sequence[Message], policy: CompressPolicy, count: Counter) -> Compressed:
    msgs = list(messages)
    before = count(msgs)
    out = Compressed(msgs, before, before)
    if len(msgs) < 2:
        return out
    lead = _lead(msgs)
    turns = _turns(msgs[lead:])
    last = len(msgs) - len(turns[-1]) if turns else len(msgs)  # the newest turn is never rewritten
    if policy.dedupe_tool_outputs and (n := _dedupe_tools(msgs, last)):
        out.notes.append(f"{n} repeated tool output(s)")
    if policy.dedupe_paragraphs and (n := _dedupe_paragraphs(msgs, lead, last, policy.min_paragraph_chars)):
        out.notes.append(f"{n} message(s) with repeated paragraphs")
    limit = policy.max_input_tokens
    if limit is not None and count(msgs) > limit and len(turns) > 1:
        turns = _turns(msgs[lead:])
        head = msgs[:lead]
        k = 0
        step = max(1, policy.block)
        while k < len(turns) - 1:
            k = min(len(turns) - 1, k + step)  # on the grid (or all but the newest turn)
            if count(head + [m for t in turns[k:] for m in t]) <= limit:
                break
        out.dropped = [m for t in turns[:k] for m in t]
        msgs = head + [m for t in turns[k:] for m in t]
        out.notes.append(f"dropped the {k} oldest turn(s)")
    out.messages = msgs
    out.tokens_after = count(msgs)
    if limit is not None and out.tokens_after > limit:
        out.notes.append(f"still {out.tokens_after} > {limit} tokens: the newest turn alone is over the budget")
    return out


def with_summary(compressed: Compressed, summary: str) -> list[Message]:
    """The compressed messages with a summary of the dropped turns after the system messages."""
    msgs = compressed.messages
    lead = _lead(msgs)
    note = {"role": "system", "content": f"Summary of the earlier part of this conversation: {summary}"}
    return [*msgs[:lead], note, *msgs[lead:]]


def summary_request(dropped: Sequence[Message], max_tokens: int) -> list[Message]:
    """What the cheap summariser model is asked (deterministic, so its answer can be cached)."""
    lines = []
    for m in dropped:
        c = m.get("content")
        text = c if isinstance(c, str) else " ".join(
            p.get("text", "") for p in c or () if isinstance(p, dict)) if isinstance(c, list) else ""
        if m.get("tool_calls"):
            text += " [called tools: " + ", ".join(
                str((t.get("function") or {}).get("name")) for t in m["tool_calls"] if isinstance(t, dict)) + "]"
        lines.append(f"{m.get('role')}: {text}")
    return [{"role": "system", "content": f"Summarise this conversation excerpt in at most {max_tokens} tokens. "
             "Keep every fact, number, decision and open question; no preamble."},
            {"role": "user", "content": "\n".join(lines)}]
