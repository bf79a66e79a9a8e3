"""A trained verifier on disk: a directory with ``manifest.json`` and ``verifier.joblib``.

The manifest is read first: ``kind`` must be ``semantic-cache-verifier`` and ``format_version``
``FORMAT_VERSION`` (and the feature set's version one this code computes) before the pickle is
touched. It records the embedding model, top_k, the threshold calibrated for the target precision,
the split and data digest it was trained on, and library versions. Only load artefacts you built:
the fitted model is a joblib pickle.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from margin import artefacts
from margin.cache_eval.features import FEATURES_VERSION, SUPPORTED_VERSIONS
from margin.cache_eval.verifier import Verifier

KIND = "semantic-cache-verifier"
FORMAT_VERSION = 1
MODEL_FILE = "verifier.joblib"


class ArtefactError(Exception):
    """Missing, malformed or incompatible verifier artefact."""


FORMAT = artefacts.Format("verifier", MODEL_FILE, FORMAT_VERSION, "margin cache train-verifier",
                          ArtefactError, KIND)


def save_verifier(model: Any, out: Path, fields: Mapping[str, Any]) -> Path:
    return artefacts.save(FORMAT, model, out, {"features_version": FEATURES_VERSION, **dict(fields)})


def _features(manifest: dict[str, Any], f: Path) -> None:
    if manifest.get("features_version") not in SUPPORTED_VERSIONS:
        raise ArtefactError(f"{f}: verifier features_version {manifest.get('features_version')!r} is not one "
                            f"this margin computes {SUPPORTED_VERSIONS}; retrain with `margin cache train-verifier`")


REQUIRED = ("model", "top_k", "dim")


def read_manifest(path: Path) -> dict[str, Any]:
    return artefacts.read_manifest(FORMAT, path, REQUIRED, _features)


def load_verifier(path: str | Path) -> Verifier:
    manifest, model, d = artefacts.load(FORMAT, path, REQUIRED, _features)
    if not hasattr(model, "predict_proba"):
        raise ArtefactError(f"{d}: {MODEL_FILE} holds a {type(model).__name__}, not a classifier")
    return Verifier(model, manifest)
