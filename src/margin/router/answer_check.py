"""Checks on a model's worked answer to a word problem, as numbers a cascade verifier learns from.

A cheap model's wrong answers to arithmetic word problems leave traces: a calculation that does
not add up (``48/2 = 25``), a quantity from the question never used, an operand that comes from
nowhere, no final answer, a final answer that is not the last result computed or not a whole
number. ``features(prompt, answer)`` measures these (plus sizes) as one vector; the verifier
(``margin.router.verifier``) combines it with text features into P(answer is right).

Arithmetic is evaluated by a small AST walker (numbers and + - * / ** % only, bounded sizes),
never by ``eval``: answers are untrusted text.
"""

from __future__ import annotations

import ast
import math
import operator
import re
from collections.abc import Callable

FEATURES = (
    "annotations", "annotation_errors", "inline_errors", "inline_checks", "has_final", "final_is_integer",
    "final_negative", "log_answer_chars", "log_prompt_chars", "prompt_numbers", "answer_lines", "final_in_prompt",
    "ends_with_final", "final_markers", "prompt_numbers_unused", "share_prompt_numbers_unused",
    "unexplained_operands", "final_equals_last_result", "answer_numbers",
)

_BIN: dict[type[ast.operator], Callable[[float, float], float]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.Pow: operator.pow, ast.Mod: operator.mod,
}
_NUM = r"\d[\d,]*(?:\.\d+)?"
# GSM8K-style calculator annotations: <<48/2=24>>
_ANNOTATION = re.compile(r"<<([^<>=]{1,200})=([^<>]{1,40})>>")
# inline arithmetic in prose: 3 x 60 = 180, $12 * 4 = $48
_INLINE = re.compile(rf"(\$?{_NUM}(?:\s*[-+*/x×]\s*\$?{_NUM})+)\s*=\s*\$?(-?{_NUM})")
_FINAL = re.compile(r"(?:####|answer is:?)\s*\$?(-?[\d,]*\.?\d+)", re.IGNORECASE)
_RESULT = re.compile(rf"=\s*\$?(-?{_NUM})")
# numbers a worked answer may bring in without them being in the question (units, halves, percents)
_COMMON = frozenset({0.5, 1.0, 2.0, 3.0, 4.0, 7.0, 10.0, 12.0, 24.0, 52.0, 60.0, 100.0, 1000.0})


def _eval(node: ast.AST) -> float:
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float) and not isinstance(node.value, bool):
        if abs(node.value) > 1e12:
            raise ValueError("number too large")
        return float(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _BIN:
        a, b = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow) and (abs(b) > 10 or abs(a) > 1e6):
            raise ValueError("power too large")
        return _BIN[type(node.op)](a, b)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        v = _eval(node.operand)
        return -v if isinstance(node.op, ast.USub) else v
    raise ValueError("not arithmetic")


def arithmetic(expr: str) -> float | None:
    """Value of a plain arithmetic expression (``x`` and ``×`` mean times, ``^`` power; commas and
    ``$`` ignored), or None if it is not one."""
    s = expr.replace("×", "*").replace("x", "*").replace("^", "**").replace(",", "").replace("$", "").strip()
    if not s or len(s) > 200:
        return None
    try:
        return _eval(ast.parse(s, mode="eval").body)
    except (SyntaxError, ValueError, ZeroDivisionError, OverflowError, RecursionError):
        return None


def to_number(s: str) -> float | None:
    try:
        return float(s.replace(",", "").replace("$", "").strip())
    except ValueError:
        return None


def holds(expr: str, value: str) -> bool | None:
    """Whether ``expr`` evaluates to ``value`` (to the cent, or 0.01% when large); None if unreadable."""
    x, v = arithmetic(expr), to_number(value)
    if x is None or v is None:
        return None
    return abs(x - v) <= max(0.01, 1e-4 * abs(x))


def numbers(text: str) -> set[float]:
    out: set[float] = set()
    for tok in re.findall(_NUM, text):
        v = to_number(tok)
        if v is not None:
            out.add(round(v, 4))
    return out


def features(prompt: str, answer: str) -> list[float]:
    """The ``FEATURES`` of one (question, answer) pair, in order."""
    body = answer.split("####")[0]
    notes = _ANNOTATION.findall(answer)
    note_ok = [holds(e, v) for e, v in notes]
    inline = _INLINE.findall(answer)
    inline_ok = [holds(e, v) for e, v in inline]
    m = _FINAL.search(answer)
    final = to_number(m.group(1)) if m else None
    in_prompt, in_body = numbers(prompt), numbers(body)
    unused = len(in_prompt - in_body)
    results = {round(v, 4) for _, val in notes if (v := to_number(val)) is not None}
    operands: set[float] = set()
    for e, _ in [*notes, *inline]:
        operands |= numbers(e)
    unexplained = len(operands - in_prompt - results - _COMMON)
    last = _RESULT.findall(body)
    last_v = to_number(last[-1]) if last else None
    return [
        float(len(notes)), float(sum(ok is False for ok in note_ok)), float(sum(ok is False for ok in inline_ok)),
        float(len(inline)), float(m is not None), float(final is not None and final.is_integer()),
        float(final is not None and final < 0), math.log1p(len(answer)), math.log1p(len(prompt)),
        float(len(in_prompt)), float(answer.count("\n")),
        float(final is not None and round(final, 4) in in_prompt),
        float(m is not None and answer.strip().endswith(m.group(1))), float(answer.count("####")),
        float(unused), unused / max(1, len(in_prompt)), float(unexplained),
        float(final is not None and last_v is not None and abs(final - last_v) < 1e-6), float(len(in_body)),
    ]
