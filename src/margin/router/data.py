"""Routing data sets loaded into one table: prompts, per-model scores (0..1) and per-model cost of
each query in USD. Three layouts are read:

- ``routellm``: lm-sys/RouteLLM's MMLU per-subject CSVs (a directory or files) and
  ``gsm8k_responses.csv``; prompts listed in a sibling ``*_contaminated_prompts.jsonl`` are dropped.
- ``dc``: ulab-uiuc/LLMRouter's ``{question, scores}`` JSON, priced from ``llm_candidates.json``.
- ``routerbench``: RouterBench's wide CSV (one score column per model, ``<model>|total_cost``).

Costs. RouteLLM ships no costs: a query costs input tokens (``count_text(prompt)``) plus output
tokens (``count_text(response)`` where a response exists, i.e. GSM8K, else ``MMLU_OUTPUT_TOKENS``)
at the models' list prices from genai-prices (falling back to ``ROUTELLM_PRICES``). LLMRouter's
data gives prices per million tokens but no responses: output is ``DC_OUTPUT_TOKENS`` per query.
"""

from __future__ import annotations

import ast
import csv
import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from margin.pricing.tokens import count_text

WEAK = "mistralai/Mixtral-8x7B-Instruct-v0.1"
STRONG = "gpt-4-1106-preview"
# USD per million tokens (input, output), used when genai-prices has no entry.
ROUTELLM_PRICES: dict[str, tuple[float, float]] = {STRONG: (10.0, 30.0), WEAK: (0.24, 0.24)}
GENAI_REFS = {STRONG: "openai/gpt-4-1106-preview", WEAK: "mistral/mixtral-8x7b"}
MMLU_OUTPUT_TOKENS = 5  # the answer letter plus a few tokens of framing
DC_OUTPUT_TOKENS = 200  # assumed mean completion length of LLMRouter's (mostly reasoning) tasks
FORMATS = ("routellm", "dc", "routerbench")

Array = npt.NDArray[np.float64]


@dataclass
class RoutingTable:
    """One row per query. ``scores[i, j]`` is model j's quality on query i (0..1) and
    ``costs[i, j]`` what model j costs on query i, in USD. ``responses`` holds, per model, its
    answer to every query where the data ships answers (RouteLLM's GSM8K): a cascade's verifier
    learns from them."""

    prompts: list[str]
    models: list[str]
    scores: Array
    costs: Array
    groups: list[str] = field(default_factory=list)
    source: str = ""
    notes: dict[str, Any] = field(default_factory=dict)
    responses: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n, m = len(self.prompts), len(self.models)
        if self.scores.shape != (n, m) or self.costs.shape != (n, m):
            raise ValueError(f"scores {self.scores.shape} / costs {self.costs.shape} do not match ({n}, {m})")
        if not self.groups:
            self.groups = [""] * n
        for name, r in self.responses.items():
            if len(r) != n:
                raise ValueError(f"{name}: {len(r)} responses for {n} queries")

    def __len__(self) -> int:
        return len(self.prompts)

    def subset(self, idx: Sequence[int] | npt.NDArray[np.int_]) -> RoutingTable:
        ix = np.asarray(idx, dtype=np.int64)
        return RoutingTable([self.prompts[i] for i in ix], list(self.models), self.scores[ix], self.costs[ix],
                            [self.groups[i] for i in ix], self.source, dict(self.notes),
                            {m: [r[i] for i in ix] for m, r in self.responses.items()})

    def summary(self) -> dict[str, Any]:
        return {"rows": len(self), "source": self.source, "models": list(self.models),
                "quality": {m: round(float(self.scores[:, j].mean()), 4) for j, m in enumerate(self.models)},
                "mean_cost_usd": {m: float(self.costs[:, j].mean()) for j, m in enumerate(self.models)},
                **self.notes}


def concat(tables: Sequence[RoutingTable]) -> RoutingTable:
    if not tables:
        raise ValueError("no tables to concatenate")
    models = tables[0].models
    for t in tables[1:]:
        if t.models != models:
            raise ValueError(f"tables have different models: {t.models} vs {models}")
    return RoutingTable([p for t in tables for p in t.prompts], list(models),
                        np.vstack([t.scores for t in tables]), np.vstack([t.costs for t in tables]),
                        [g for t in tables for g in t.groups], "+".join(t.source for t in tables),
                        {k: v for t in tables for k, v in t.notes.items()},
                        {m: [x for t in tables for x in t.responses[m]] for m in tables[0].responses
                         if all(m in t.responses for t in tables)})


def _truth(v: str) -> float:
    s = v.strip().lower()
    if s in ("true", "1", "1.0", "yes"):
        return 1.0
    if s in ("false", "0", "0.0", "no", ""):
        return 0.0
    return float(s)


def routellm_prices() -> dict[str, tuple[float, float]]:
    """(input, output) USD per million tokens for the two RouteLLM models."""
    out = dict(ROUTELLM_PRICES)
    try:
        from margin.pricing import genai_rates

        for model, ref in GENAI_REFS.items():
            r = genai_rates(ref)
            out[model] = (float(r.input.base), float(r.output.base))
    except Exception:  # pragma: no cover - genai-prices is a dependency; keep the stated fallback
        pass
    return out


def _contaminated(csv_path: Path) -> set[str]:
    """Prompts to exclude: ``eval_prompt`` of the ``*_contaminated_prompts.jsonl`` next to the data."""
    name = "gsm8k" if "gsm8k" in csv_path.name else "mmlu"
    out: set[str] = set()
    for d in (csv_path.parent, csv_path.parent.parent):
        f = d / f"{name}_contaminated_prompts.jsonl"
        if f.exists():
            for line in f.read_text().splitlines():
                if line.strip():
                    out.add(json.loads(line)["eval_prompt"])
            break
    return out


def _csv_files(paths: Iterable[Path]) -> list[Path]:
    files: list[Path] = []
    for p in paths:
        files.extend(sorted(p.glob("*.csv")) if p.is_dir() else [p])
    return files


def load_routellm(paths: Iterable[Path], prices: dict[str, tuple[float, float]] | None = None) -> RoutingTable:
    csv.field_size_limit(sys.maxsize)
    pr = prices or routellm_prices()
    models = [WEAK, STRONG]
    prompts: list[str] = []
    groups: list[str] = []
    scores: list[list[float]] = []
    costs: list[list[float]] = []
    responses: dict[str, list[str]] = {m: [] for m in models}
    dropped = 0
    for f in _csv_files(paths):
        bad = _contaminated(f)
        group = f.stem.removeprefix("mmlu_")
        with f.open(newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                prompt = row["prompt"]
                if prompt in bad:
                    dropped += 1
                    continue
                n_in = count_text(prompt)
                prompts.append(prompt)
                groups.append(group)
                scores.append([_truth(row[m]) for m in models])
                c = []
                for m in models:
                    resp = row.get(f"{m}_response")
                    responses[m].append(resp or "")
                    n_out = count_text(resp) if resp is not None else MMLU_OUTPUT_TOKENS
                    c.append((n_in * pr[m][0] + n_out * pr[m][1]) / 1e6)
                costs.append(c)
    notes = {"contaminated_dropped": dropped,
             "prices_usd_per_mtok": {m: list(pr[m]) for m in models},
             "output_tokens": f"count_text(response) where present, else {MMLU_OUTPUT_TOKENS}"}
    if any(not any(r) for r in responses.values()):
        responses = {}  # MMLU: no answers shipped
    return RoutingTable(prompts, models, np.asarray(scores, dtype=np.float64), np.asarray(costs, dtype=np.float64),
                        groups, "routellm", notes, responses)


def _candidates_file(path: Path) -> Path:
    return path.parent / "llm_candidates.json"


def load_dc(paths: Iterable[Path], output_tokens: int = DC_OUTPUT_TOKENS) -> RoutingTable:
    tables = []
    for path in paths:
        rows = json.loads(path.read_text())
        cand = json.loads(_candidates_file(path).read_text())
        models = sorted(rows[0]["scores"])
        price = {m: (float(cand[m]["input_price"]), float(cand[m]["output_price"])) for m in models}
        prompts = [r["question"] for r in rows]
        scores = np.asarray([[float(r["scores"][m]) for m in models] for r in rows], dtype=np.float64)
        n_in = np.asarray([count_text(p) for p in prompts], dtype=np.float64)
        costs = np.stack([(n_in * price[m][0] + output_tokens * price[m][1]) / 1e6 for m in models], axis=1)
        groups = [str(r.get("task_name", r.get("cluster_id", ""))) for r in rows]
        tables.append(RoutingTable(prompts, models, scores, costs, groups, "dc",
                                   {"prices_usd_per_mtok": {m: list(price[m]) for m in models},
                                    "output_tokens": f"{output_tokens} assumed per query"}))
    return concat(tables)


def _first_text(v: str) -> str:
    if v.startswith("["):
        try:
            parsed = ast.literal_eval(v)
            if isinstance(parsed, list):
                return "\n".join(str(x) for x in parsed)
        except (ValueError, SyntaxError):
            pass
    return v


def load_routerbench(paths: Iterable[Path]) -> RoutingTable:
    csv.field_size_limit(sys.maxsize)
    tables = []
    for f in _csv_files(paths):
        with f.open(newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        if not rows:
            continue
        models = [c.removesuffix("|total_cost") for c in rows[0] if c.endswith("|total_cost")]
        tables.append(RoutingTable(
            [_first_text(r["prompt"]) for r in rows], models,
            np.asarray([[float(r[m] or 0) for m in models] for r in rows], dtype=np.float64),
            np.asarray([[float(r[f"{m}|total_cost"] or 0) for m in models] for r in rows], dtype=np.float64),
            [r.get("eval_name", "") for r in rows], "routerbench"))
    return concat(tables)


def load(fmt: str, paths: Iterable[Path]) -> RoutingTable:
    ps = list(paths)
    if fmt == "routellm":
        return load_routellm(ps)
    if fmt == "dc":
        return load_dc(ps)
    if fmt == "routerbench":
        return load_routerbench(ps)
    raise ValueError(f"unknown format {fmt!r} (one of {', '.join(FORMATS)})")
