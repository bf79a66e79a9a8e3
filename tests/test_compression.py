"""Context compression: properties of the pure policy (hypothesis), then through the gateway
(tokens saved in the ledger, a linked summary call, the cache still keyed on the original)."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
from hypothesis import given, settings
from hypothesis import strategies as st

from margin.policy.compress import CompressPolicy, compress, with_summary
from margin.pricing.tokens import count_messages
from tests.conftest import Mock, gateway_config, start_gateway, stop

WORDS = st.sampled_from(["alpha", "beta", "gamma", "delta", "invoice", "refund", "ticket", "status", "42"])
TEXT = st.lists(WORDS, min_size=1, max_size=60).map(" ".join)


@st.composite
def conversations(draw: st.DrawFn) -> list[dict[str, Any]]:
    msgs: list[dict[str, Any]] = [{"role": "system", "content": draw(TEXT)}]
    for i in range(draw(st.integers(1, 14))):
        msgs.append({"role": "user", "content": draw(TEXT)})
        if draw(st.booleans()):  # an agent step: a tool call and its result
            msgs.append({"role": "assistant", "content": None, "tool_calls": [
                {"id": f"c{i}", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}]})
            msgs.append({"role": "tool", "tool_call_id": f"c{i}", "content": draw(TEXT)})
        msgs.append({"role": "assistant", "content": draw(TEXT)})
    msgs.append({"role": "user", "content": draw(TEXT)})
    return msgs


def _tool_pairs_intact(msgs: list[dict[str, Any]]) -> bool:
    called = {c["id"] for m in msgs for c in m.get("tool_calls") or ()}
    answered = {m["tool_call_id"] for m in msgs if m.get("role") == "tool"}
    return called == answered


@settings(max_examples=200, deadline=None)
@given(conversations(), st.integers(60, 600), st.integers(1, 5))
def test_keeps_system_and_newest_turn_and_fits(msgs: list[dict[str, Any]], budget: int, block: int) -> None:
    original = [dict(m) for m in msgs]
    # Dedupe off here: this checks what dropping turns does (dedupe is tested on its own below).
    policy = CompressPolicy(max_input_tokens=budget, block=block, dedupe_tool_outputs=False, dedupe_paragraphs=False)
    c = compress(msgs, policy, count_messages)
    assert msgs == original  # the caller's list is never edited
    assert c.messages[0] == msgs[0]  # system prompt kept verbatim
    assert c.messages[-1] == msgs[-1]  # newest turn kept
    assert _tool_pairs_intact(c.messages)
    newest_alone = count_messages([msgs[0], msgs[-1]])
    assert c.tokens_after <= budget or c.tokens_after <= newest_alone + 10 or len(c.messages) == 2
    assert c.tokens_after == count_messages(c.messages) <= c.tokens_before
    kept = c.messages[1:]
    assert kept == msgs[len(msgs) - len(kept):]  # only whole oldest turns go, in order
    assert c.dropped == msgs[1:len(msgs) - len(kept)]


@settings(max_examples=100, deadline=None)
@given(conversations(), st.integers(80, 400))
def test_prefix_stays_stable_as_the_conversation_grows(msgs: list[dict[str, Any]], budget: int) -> None:
    """Two consecutive calls of one conversation: unless the cut moved, the second prompt starts
    with the first one's kept history (so a provider's prompt cache keeps hitting)."""
    policy = CompressPolicy(max_input_tokens=budget, block=4)
    first = compress(msgs, policy, count_messages)
    longer = [*msgs, {"role": "assistant", "content": "ok"}, {"role": "user", "content": "and then?"}]
    second = compress(longer, policy, count_messages)
    if len(second.dropped) == len(first.dropped):
        assert second.messages[:len(first.messages)] == first.messages


def test_dedupes_repeated_tool_outputs_and_paragraphs() -> None:
    page = "The refund policy says customers get their money back within 30 days of purchase. " * 4
    msgs = [{"role": "system", "content": "You are a support agent."},
            {"role": "user", "content": "Check order 1"},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "a", "type": "function",
                                                                    "function": {"name": "fetch", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "a", "content": page},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "b", "type": "function",
                                                                    "function": {"name": "fetch", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "b", "content": page},
            {"role": "user", "content": f"Summarise.\n\n{page.strip()}\n\nThanks"}]
    c = compress(msgs, CompressPolicy(), count_messages)
    assert c.messages[5]["content"] == "[identical to the output of tool call a above]"
    assert c.messages[3]["content"] == page and c.messages[-1] == msgs[-1]
    assert c.tokens_saved > 50 and not c.dropped


def test_summary_goes_after_the_system_prompt() -> None:
    msgs = [{"role": "system", "content": "s"}] + [
        {"role": r, "content": f"turn {i} " * 30} for i in range(8) for r in ("user", "assistant")] + [
        {"role": "user", "content": "last"}]
    c = compress(msgs, CompressPolicy(max_input_tokens=120, block=2), count_messages)
    assert c.dropped
    out = with_summary(c, "they talked")
    assert out[0] == msgs[0] and out[1]["role"] == "system" and "they talked" in out[1]["content"]
    assert out[2:] == c.messages[1:]


# -- through the gateway -----------------------------------------------------------------------------

def test_gateway_compresses_meters_savings_and_links_the_summary(mock_upstream: Mock, tmp_path: Path) -> None:
    cfg = gateway_config(tmp_path, mock_upstream.url, f"sqlite:///{tmp_path}/l.db",
                         groups=[{"name": "support", "candidates": ["gpt-4o"],
                                  "compress": {"max_input_tokens": 300, "block": 2,
                                               "summarise_with": "gpt-4o-mini", "summary_max_tokens": 64}}])
    gw = start_gateway(tmp_path, cfg)
    try:
        key = gw.create_key(team="support")["key"]
        msgs = [{"role": "system", "content": "You are a careful support agent."}]
        for i in range(12):
            msgs += [{"role": "user", "content": f"question {i}: " + "details about the order " * 10},
                     {"role": "assistant", "content": f"answer {i}: " + "we looked into it " * 10}]
        msgs.append({"role": "user", "content": "So what is the status now?"})
        r = httpx.post(gw.base_url + "/chat/completions", timeout=30, headers={"Authorization": f"Bearer {key}"},
                       json={"model": "support", "messages": msgs, "max_tokens": 20})
        assert r.status_code == 200
        sent = mock_upstream.last_request()
        assert sent["messages"][0] == msgs[0] and sent["messages"][-1] == msgs[-1]
        summary_note = sent["messages"][1]
        assert summary_note["role"] == "system" and "Summary of the earlier part" in summary_note["content"]
        assert count_messages(sent["messages"]) < count_messages(msgs)
        rows = gw.events(expect=2)
        main = next(e for e in rows if e["requested_model"] == "support")
        summary = next(e for e in rows if e["requested_model"] == "gpt-4o-mini")
        assert summary["parent_event_id"] == main["event_id"] and Decimal(summary["cost_usd"]) > 0
        assert main["tokens_saved"] > 300 and "compression" in main["lever"]
        assert Decimal(main["avoided_cost_usd"]) > 0
        # The same conversation again: the summary of the same dropped block comes from the cache.
        r = httpx.post(gw.base_url + "/chat/completions", timeout=30, headers={"Authorization": f"Bearer {key}"},
                       json={"model": "support", "messages": msgs, "max_tokens": 20})
        assert r.status_code == 200
    finally:
        assert gw.proc is not None
        stop(gw.proc)
