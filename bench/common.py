"""Paths, the request, target names and the console shared by the overhead benchmark's modules."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TypeVar

from rich.console import Console

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
VENV_BIN = ROOT / ".venv" / "bin"
PYTHON = VENV_BIN / "python"
MARGIN = VENV_BIN / "margin"
LITELLM = ROOT / ".venv-litellm" / "bin" / "litellm"
LITELLM_VERSION = "1.106.2"
LOADGEN = BENCH / "loadgen.py"
RESULTS_JSON = BENCH / "results" / "overhead.json"

MODEL = "gpt-4o-mini"
BODY = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello in five words"}],"max_tokens":16}'
CHAT_PATH = "/v1/chat/completions"

TARGET_ORDER = ("direct", "margin", "litellm")

console = Console(width=None if sys.stdout.isatty() else 140)

_V = TypeVar("_V")


def level_key(rps: float) -> str:
    """The key of an RPS level in the results dicts (and the JSON): 200.0 -> "200"."""
    return f"{rps:g}"


def by_level(results: Mapping[str, _V]) -> list[tuple[str, _V]]:
    """The items of a dict keyed by level_key, lowest RPS first."""
    return sorted(results.items(), key=lambda kv: float(kv[0]))
