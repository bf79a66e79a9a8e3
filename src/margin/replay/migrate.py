"""Migration check: price a switch to a candidate model on a trace, then re-validate it by sending a
sample of the recorded prompts to the candidate through a running gateway (shadow traffic, metered
and tagged `shadow=migration` like any other call) and scoring its answers against the recorded
reference answers.

Scorers: ``exact`` (case- and whitespace-insensitive), ``numeric`` (the final number: GSM8K's
``#### 42`` or else the last number in the text), ``json`` (the answer parses as JSON),
``regex:PATTERN`` (with a capture group: equal captures in both; without: the answer matches), and
``judge:MODEL`` (MODEL, through the gateway, says whether the answer matches the reference)."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import numpy as np

from margin.domain import ZERO, usd
from margin.replay.traces import Trace

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_GSM_FINAL = re.compile(r"####\s*(-?[\d,]*\.?\d+)")
JUDGE_PROMPT = ("You compare an answer with a reference answer to the same request.\n\nRequest:\n{prompt}\n\n"
                "Reference answer:\n{reference}\n\nAnswer to judge:\n{answer}\n\nIs the answer correct and "
                "equivalent to the reference? Reply with exactly one word: YES or NO.")
Scorer = Callable[[str, str, str], bool]  # (prompt, reference, answer) -> agrees


class MigrationError(ValueError):
    """A bad scorer, a trace without what the check needs, or no gateway to send to."""


def final_number(text: str) -> float | None:
    m = _GSM_FINAL.search(text)
    raw = m.group(1) if m else (_NUMBER.findall(text) or [None])[-1]
    if raw is None:
        return None
    try:
        return float(raw.replace(",", ""))
    except ValueError:
        return None


def _norm(text: str) -> str:
    return " ".join(text.split()).casefold()


def make_scorer(spec: str, judge: Callable[[str], str] | None = None) -> Scorer:
    """A scorer from its name; ``judge`` sends a prompt to the judge model and returns its reply."""
    if spec == "exact":
        return lambda _p, ref, ans: _norm(ref) == _norm(ans)
    if spec == "numeric":
        def numeric(_p: str, ref: str, ans: str) -> bool:
            a, b = final_number(ref), final_number(ans)
            return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)
        return numeric
    if spec == "json":
        def valid(_p: str, _ref: str, ans: str) -> bool:
            try:
                json.loads(ans)
            except ValueError:
                return False
            return True
        return valid
    if spec.startswith("regex:"):
        try:
            rx = re.compile(spec[6:], re.S)
        except re.error as e:
            raise MigrationError(f"--scorer {spec!r}: bad regular expression: {e}") from None
        if rx.groups:
            def captured(_p: str, ref: str, ans: str) -> bool:
                a, b = rx.search(ref), rx.search(ans)
                return a is not None and b is not None and a.groups() == b.groups()
            return captured
        return lambda _p, _ref, ans: rx.search(ans) is not None
    if spec.startswith("judge:"):
        if judge is None:
            raise MigrationError("the judge scorer needs a gateway (--gateway and --key)")
        def judged(p: str, ref: str, ans: str) -> bool:
            reply = judge(JUDGE_PROMPT.format(prompt=p, reference=ref, answer=ans))
            return reply.strip().upper().startswith("YES")
        return judged
    raise MigrationError(f"--scorer {spec!r}: use exact, numeric, json, regex:PATTERN or judge:MODEL")


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k/n."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


@dataclass
class ShadowResult:
    candidate: str
    scorer: str
    sampled: int
    answered: int = 0
    agreed: int = 0
    errors: list[str] = field(default_factory=list)
    cost_usd: Decimal = ZERO
    disagreements: list[dict[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        lo, hi = wilson(self.agreed, self.answered)
        return {"candidate": self.candidate, "scorer": self.scorer, "sampled": self.sampled,
                "answered": self.answered, "agreed": self.agreed,
                "agreement": round(self.agreed / self.answered, 4) if self.answered else None,
                "agreement_ci95": [round(lo, 4), round(hi, 4)] if self.answered else None,
                "errors": len(self.errors), "first_errors": self.errors[:3], "shadow_cost_usd": usd(self.cost_usd),
                "disagreements": self.disagreements[:5]}


def _messages(trace: Trace, i: int) -> list[dict[str, Any]]:
    if trace.messages is not None and trace.messages[i] is not None:
        return list(trace.messages[i] or [])
    assert trace.prompts is not None
    return [{"role": "user", "content": trace.prompts[i] or ""}]


def shadow(trace: Trace, candidate: str, gateway: str, key: str, scorer_spec: str, sample: int = 50, seed: int = 0,
           max_tokens: int | None = None, workers: int = 4, timeout_s: float = 120.0) -> ShadowResult:
    """Send up to ``sample`` recorded prompts (with reference answers) to ``candidate`` through the
    gateway at ``gateway`` (its base URL, e.g. http://127.0.0.1:4000/v1) and score the answers."""
    from openai import OpenAI

    if trace.responses is None or (trace.prompts is None and trace.messages is None):
        raise MigrationError(f"trace {trace.name!r} records no prompts with reference responses; a shadow check "
                             "needs a margin trace JSONL with `messages` (or `prompt`) and `response` per line")
    rows = [i for i in range(len(trace)) if trace.responses[i] is not None
            and ((trace.messages is not None and trace.messages[i] is not None)
                 or (trace.prompts is not None and trace.prompts[i] is not None))]
    if not rows:
        raise MigrationError(f"trace {trace.name!r}: no request has both a prompt and a reference response")
    rng = np.random.default_rng(seed)
    picked = sorted(rng.choice(rows, size=min(sample, len(rows)), replace=False).tolist())
    client = OpenAI(base_url=gateway, api_key=key, timeout=timeout_s, max_retries=1)
    headers = {"X-Margin-Tags": "shadow=migration"}
    out = ShadowResult(candidate, scorer_spec, len(picked))

    def ask(model: str, messages: list[dict[str, Any]]) -> tuple[str, Decimal]:
        extra: dict[str, Any] = {"max_tokens": max_tokens} if max_tokens else {}
        raw = client.chat.completions.with_raw_response.create(model=model, messages=messages,  # type: ignore[arg-type]
                                                               temperature=0, extra_headers=headers, **extra)
        reply = raw.parse()
        text = reply.choices[0].message.content or "" if reply.choices else ""
        return text, Decimal(raw.headers.get("x-margin-cost-usd") or 0)

    judge_cost: list[Decimal] = []

    def judge(prompt: str) -> str:
        text, cost = ask(scorer_spec.removeprefix("judge:"), [{"role": "user", "content": prompt}])
        judge_cost.append(cost)
        return text

    scorer = make_scorer(scorer_spec, judge if scorer_spec.startswith("judge:") else None)

    def one(i: int) -> tuple[int, str | None, Decimal, str]:
        try:
            text, cost = ask(candidate, _messages(trace, i))
        except Exception as e:  # any SDK/HTTP failure is reported, not raised: the sample goes on
            return i, None, ZERO, f"{type(e).__name__}: {e}"
        return i, text, cost, ""

    with ThreadPoolExecutor(max(1, workers)) as pool:
        answers = list(pool.map(one, picked))
    for i, text, cost, err in answers:
        out.cost_usd += cost
        if text is None:
            out.errors.append(f"request {i}: {err}")
            continue
        prompt = (trace.prompts[i] if trace.prompts is not None else None) or json.dumps(_messages(trace, i))
        ref = trace.responses[i] or ""
        try:
            agreed = scorer(prompt, ref, text)
        except Exception as e:
            out.errors.append(f"request {i}: scorer failed: {type(e).__name__}: {e}")
            continue
        out.answered += 1
        out.agreed += int(agreed)
        if not agreed:
            out.disagreements.append({"request": str(i), "prompt": prompt[:160], "reference": ref[-160:],
                                      "answer": text[-160:]})
    out.cost_usd += sum(judge_cost, ZERO)
    return out
