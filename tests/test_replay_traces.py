"""Trace readers: the shared Azure and Mooncake traces, hand-made files, and precise errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from margin.replay.traces import TraceError, read_trace, resample
from tests.conftest import SHARED_DATA

HERE = Path(__file__).parent / "data" / "traces"
TRACES = SHARED_DATA / "traces"


def test_azure_conv_matches_the_data_readme() -> None:
    t = read_trace(TRACES / "azure2023_conv.csv")
    assert (t.source, len(t)) == ("azure", 19366)
    assert t.arrival_s[0] == 0 and np.all(np.diff(t.arrival_s) >= 0)
    assert round(float(t.input_tokens.mean())) == 1155 and round(float(t.output_tokens.mean())) == 211
    assert t.start is not None and t.start.isoformat().startswith("2023-11-16T18:15:46")
    assert 5.4 < t.rate_per_s < 5.6 and t.hash_ids is None


def test_mooncake_conversation_keeps_hash_ids() -> None:
    t = read_trace(TRACES / "mooncake_conversation.jsonl")
    assert (t.source, len(t)) == ("mooncake", 12031)
    assert round(float(t.input_tokens.mean())) == 12035
    assert t.hash_ids is not None and all(len(h) == -(-n // 512) for h, n in zip(t.hash_ids, t.input_tokens,
                                                                                strict=True))


def test_unsorted_csv_is_sorted_and_limit_keeps_the_first_lines() -> None:
    t = read_trace(HERE / "tiny_azure.csv")
    assert list(t.input_tokens) == [374, 1000, 396]  # by time, not by line
    assert t.arrival_s[1] == pytest.approx(1.31941)
    assert len(read_trace(HERE / "tiny_azure.csv", limit=2)) == 2


def test_margin_jsonl_with_messages_and_responses() -> None:
    t = read_trace(HERE / "gsm8k_sample.jsonl")
    assert t.source == "margin" and len(t) == 24
    assert t.prompts is not None and t.responses is not None and t.messages is not None
    assert t.input_tokens.min() > 10 and t.output_tokens.min() > 5  # estimated from the text
    assert t.start is not None and t.arrival_s[-1] == 115


def test_hand_made_margin_trace_with_attribution() -> None:
    t = read_trace(HERE / "tiny.jsonl")
    assert list(t.attrs["team"]) == ["a", "a", "b", "a"]
    assert t.prompt_hash is not None and list(t.prompt_hash) == ["p1", "p2", "p1", "p3"]


def test_resample_and_scale() -> None:
    t = read_trace(TRACES / "azure2023_conv.csv")
    r = resample(t, 50_000, seed=3)
    assert len(r) == 50_000 and np.all(np.diff(r.arrival_s) >= 0)
    assert abs(r.rate_per_s - t.rate_per_s) / t.rate_per_s < 0.05
    assert set(np.unique(r.input_tokens)) <= set(np.unique(t.input_tokens))
    assert t.scaled(10).rate_per_s == pytest.approx(t.rate_per_s * 10)


@pytest.mark.parametrize(("content", "needle"), [
    ("a,b,c\n1,2,3\n", "not a trace margin can read"),
    ('{"foo": 1}\n', "not a trace margin can read"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46,12\n", ":2: bad Azure trace line"),
    ('{"timestamp": 0, "input_length": -5, "output_length": 1}\n', "'input_length' must be a non-negative integer"),
    ('{"input_tokens": 5}\n', "needs 'output_tokens' or a 'response'"),
    ('{"input_tokens": 5, "output_tokens": 1}\nnot json\n', ":2: not valid JSON"),
    ("", "not a trace margin can read"),
])
def test_bad_traces_say_where_and_why(tmp_path: Path, content: str, needle: str) -> None:
    p = tmp_path / "t.jsonl"
    p.write_text(content)
    with pytest.raises(TraceError) as e:
        read_trace(p)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_missing_file() -> None:
    with pytest.raises(TraceError, match="no such file"):
        read_trace("/nonexistent/trace.csv")
