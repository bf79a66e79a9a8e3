"""A trained model on disk, the shape every margin artefact shares (learned router, cascade
verifier, semantic-cache verifier): a directory with ``manifest.json``, read and checked first, and
a joblib pickle named by the manifest's ``model_file``. Only load artefacts you built: joblib is pickle.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import sklearn

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Format:
    """What one kind of artefact must say about itself, and how to tell the user to rebuild it."""

    what: str  # "router", "cascade verifier", ...: the noun in every error
    model_file: str
    format_version: int
    retrain: str  # the command that writes a current one
    error: type[Exception]
    kind: str | None = None  # the manifest's "kind", where the format has one


def save(fmt: Format, model: Any, out: Path, fields: Mapping[str, Any]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    manifest = {
        **({"kind": fmt.kind} if fmt.kind else {}), "format_version": fmt.format_version,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"), **dict(fields),
        "versions": {"sklearn": sklearn.__version__, "numpy": np.__version__, "joblib": joblib.__version__},
        "model_file": fmt.model_file,
    }
    joblib.dump(model, out / fmt.model_file, compress=3)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    return out


Check = Callable[[dict[str, Any], Path], None]  # a format's own test of a manifest (raises fmt.error)


def read_manifest(fmt: Format, path: Path, required: tuple[str, ...] = (),
                  check: Check | None = None) -> dict[str, Any]:
    """The manifest at `path` (the directory or the file itself), checked before any pickle is touched."""
    f = path / MANIFEST if path.is_dir() else path
    try:
        manifest = json.loads(f.read_text())
    except FileNotFoundError:
        raise fmt.error(f"no {fmt.what} artefact at {path} (missing {MANIFEST})") from None
    except json.JSONDecodeError as e:
        raise fmt.error(f"{f}: bad JSON: {e}") from None
    if not isinstance(manifest, dict):
        raise fmt.error(f"{f}: manifest is not an object")
    if fmt.kind is not None and manifest.get("kind") != fmt.kind:
        raise fmt.error(f"{f}: not a {fmt.what} artefact (kind {fmt.kind!r} expected)")
    if manifest.get("format_version") != fmt.format_version:
        raise fmt.error(f"{f}: {fmt.what} format_version {manifest.get('format_version')!r} is not supported "
                        f"(expected {fmt.format_version}); retrain with `{fmt.retrain}`")
    for key in required:
        if key not in manifest:
            raise fmt.error(f"{f}: manifest lacks {key!r}")
    if check is not None:
        check(manifest, f)
    return manifest


def load(fmt: Format, path: str | Path, required: tuple[str, ...] = (),
         check: Check | None = None) -> tuple[dict[str, Any], Any, Path]:
    """(manifest, fitted model, directory). A scikit-learn version other than the one that trained
    the model is not an error (it usually loads) but is noted in manifest["warnings"]."""
    p = Path(path)
    manifest = read_manifest(fmt, p, required, check)
    d = p if p.is_dir() else p.parent
    name = manifest.get("model_file", fmt.model_file)
    try:
        model = joblib.load(d / name)
    except FileNotFoundError:
        raise fmt.error(f"{d}: {name} is missing") from None
    saved = manifest.get("versions", {}).get("sklearn")
    if saved and saved != sklearn.__version__:
        manifest.setdefault("warnings", []).append(f"trained with scikit-learn {saved}, running {sklearn.__version__}")
    return manifest, model, d
