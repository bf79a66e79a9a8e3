"""A trained router on disk: a directory holding ``manifest.json`` and ``router.joblib``.

The manifest (``format_version``, ``created_at``, ``models``, ``costs`` (mean USD per query the
router was trained with), ``cost_model`` (per model ``fixed_usd + per_input_token_usd * tokens``,
the per-query estimate the operating point was calibrated with), ``features``,
``operating_point`` ({"rule": "lambda", "value": x, ...}),
``training`` (data summary) and library versions) is read first; a ``format_version`` other than
``FORMAT_VERSION`` is refused before the pickle is touched. Only load artefacts you built: the
fitted model is a joblib pickle.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from margin import artefacts
from margin.policy.learned import choose_op, reason
from margin.pricing.tokens import count_text
from margin.router.train import TfidfLR

FORMAT_VERSION = 1
MODEL_FILE = "router.joblib"
REQUIRED = ("models", "costs", "operating_point")


class ArtefactError(Exception):
    """Missing, malformed or incompatible router artefact."""


FORMAT = artefacts.Format("router", MODEL_FILE, FORMAT_VERSION, "margin router train", ArtefactError)


@dataclass
class LoadedRouter:
    """What the gateway uses: ``predict(prompt)`` -> P(success) per model, ``choose(prompt)``."""

    manifest: dict[str, Any]
    model: TfidfLR

    @property
    def models(self) -> list[str]:
        return list(self.model.models)

    @property
    def operating_point(self) -> dict[str, Any]:
        return dict(self.manifest["operating_point"])

    @property
    def costs(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.manifest["costs"].items()}

    def predict(self, prompt: str) -> dict[str, float]:
        return self.model.predict(prompt)

    def estimate_costs(self, prompt: str) -> dict[str, float]:
        """Estimated USD cost of sending ``prompt`` to each model: the trained per-query cost model,
        or each model's mean cost per query when the operating point was calibrated on means
        (``cost_mode: mean``) or the artefact has no cost model."""
        cm = self.manifest.get("cost_model") or {}
        if not cm or self.operating_point.get("cost_mode") == "mean":
            return self.costs
        n = count_text(prompt)
        return {m: max(float(v["fixed_usd"]) + n * float(v["per_input_token_usd"]), 1e-12) for m, v in cm.items()}

    def choose(self, prompt: str, costs: Mapping[str, float] | None = None) -> tuple[str, str]:
        """(model, reason) at the artefact's operating point. ``costs`` (USD per call per model)
        overrides the estimate; lambda is in quality per USD, so pass costs on the same scale."""
        probs = self.predict(prompt)
        c = dict(costs) if costs is not None else self.estimate_costs(prompt)
        op = self.operating_point
        chosen = choose_op(probs, c, op)
        lam = float(op["value"]) if op.get("rule") == "lambda" else None
        thr = float(op["value"]) if op.get("rule") == "threshold" else None
        return chosen, reason(probs, c, chosen, lam=lam, threshold=thr)


def save_router(model: TfidfLR, out: Path, *, costs: Mapping[str, float], operating_point: Mapping[str, Any],
                training: Mapping[str, Any], cost_model: Mapping[str, Mapping[str, float]] | None = None) -> Path:
    return artefacts.save(FORMAT, model, out, {
        "models": list(model.models),
        "costs": {k: float(v) for k, v in costs.items()},
        "cost_model": {k: {kk: float(vv) for kk, vv in v.items()} for k, v in (cost_model or {}).items()},
        "features": model.features(),
        "operating_point": dict(operating_point),
        "training": dict(training),
    })


def load_router(path: str | Path) -> LoadedRouter:
    manifest, model, d = artefacts.load(FORMAT, path, REQUIRED)
    if not isinstance(model, TfidfLR):
        raise ArtefactError(f"{d}: {MODEL_FILE} holds a {type(model).__name__}, not a router")
    if list(model.models) != list(manifest["models"]):
        raise ArtefactError(f"{d}: manifest models {manifest['models']} != fitted models {model.models}")
    return LoadedRouter(manifest, model)
