"""A trained verifier on disk: a directory with ``manifest.json`` and ``verifier.joblib``.

The manifest is read first: ``kind`` must be ``semantic-cache-verifier`` and ``format_version``
``FORMAT_VERSION`` (and the feature set's version one this code computes) before the pickle is
touched. It records the embedding model, top_k, the threshold calibrated for the target precision,
the split and data digest it was trained on, and library versions. Only load artefacts you built:
the fitted model is a joblib pickle.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import sklearn

from margin.cache_eval.features import FEATURES_VERSION, SUPPORTED_VERSIONS
from margin.cache_eval.verifier import Verifier

KIND = "semantic-cache-verifier"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MODEL_FILE = "verifier.joblib"


class ArtefactError(Exception):
    """Missing, malformed or incompatible verifier artefact."""


def save_verifier(model: Any, out: Path, fields: Mapping[str, Any]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    manifest = {
        "kind": KIND, "format_version": FORMAT_VERSION, "features_version": FEATURES_VERSION,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"), **dict(fields),
        "versions": {"sklearn": sklearn.__version__, "numpy": np.__version__, "joblib": joblib.__version__},
        "model_file": MODEL_FILE,
    }
    joblib.dump(model, out / MODEL_FILE, compress=3)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    return out


def read_manifest(path: Path) -> dict[str, Any]:
    f = path / MANIFEST if path.is_dir() else path
    try:
        manifest = json.loads(f.read_text())
    except FileNotFoundError:
        raise ArtefactError(f"no verifier artefact at {path} (missing {MANIFEST})") from None
    except json.JSONDecodeError as e:
        raise ArtefactError(f"{f}: bad JSON: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("kind") != KIND:
        raise ArtefactError(f"{f}: not a semantic-cache verifier manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtefactError(f"{f}: verifier format_version {manifest.get('format_version')!r} is not supported "
                            f"(expected {FORMAT_VERSION}); retrain with `margin cache train-verifier`")
    if manifest.get("features_version") not in SUPPORTED_VERSIONS:
        raise ArtefactError(f"{f}: verifier features_version {manifest.get('features_version')!r} is not one this "
                            f"margin computes {SUPPORTED_VERSIONS}; retrain with `margin cache train-verifier`")
    for key in ("model", "top_k", "dim"):
        if key not in manifest:
            raise ArtefactError(f"{f}: manifest lacks {key!r}")
    return manifest


def load_verifier(path: str | Path) -> Verifier:
    p = Path(path)
    manifest = read_manifest(p)
    d = p if p.is_dir() else p.parent
    try:
        model = joblib.load(d / manifest.get("model_file", MODEL_FILE))
    except FileNotFoundError:
        raise ArtefactError(f"{d}: {manifest.get('model_file', MODEL_FILE)} is missing") from None
    if not hasattr(model, "predict_proba"):
        raise ArtefactError(f"{d}: {MODEL_FILE} holds a {type(model).__name__}, not a classifier")
    saved = manifest.get("versions", {}).get("sklearn")
    if saved and saved != sklearn.__version__:
        manifest.setdefault("warnings", []).append(f"trained with scikit-learn {saved}, running {sklearn.__version__}")
    return Verifier(model, manifest)
