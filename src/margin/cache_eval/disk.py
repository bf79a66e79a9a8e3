"""Embeddings cached on disk (default `.margin/cache_eval/<model>/`, never in git), so the full QQP
evaluation and verifier training embed each distinct text once across runs.

Rows are keyed by the SHA-1 of the text and written in shards as they are computed, so a run
that is stopped keeps what it had embedded.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from margin.cache_eval.embed import DIM, Encoder, Matrix

DEFAULT_DIR = Path(".margin/cache_eval")
SHARD = 4096


def _digest(text: str) -> bytes:
    return hashlib.sha1(text.encode("utf-8"), usedforsecurity=False).digest()


class DiskCachedEncoder:
    """Wraps an Encoder; `encode` returns cached rows and embeds (and saves) only the missing ones."""

    def __init__(self, encoder: Encoder, root: Path = DEFAULT_DIR,
                 progress: Callable[[int, int], None] | None = None) -> None:
        self.encoder = encoder
        self.name = encoder.name
        self.dir = root / re.sub(r"[^A-Za-z0-9_.-]+", "_", encoder.name)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.progress = progress
        self._rows: dict[bytes, int] = {}
        self._vecs: list[Matrix] = []
        self._n = 0
        for f in sorted(self.dir.glob("shard-*.npz")):
            with np.load(f) as z:
                keys, vecs = z["keys"], z["vecs"].astype(np.float32)
            self._add(keys, vecs)
        self._matrix: Matrix | None = None

    def _add(self, keys: np.ndarray, vecs: Matrix) -> None:
        for i, k in enumerate(keys):
            self._rows.setdefault(bytes(k), self._n + i)
        self._vecs.append(vecs)
        self._n += vecs.shape[0]
        self._matrix = None

    @property
    def cached(self) -> int:
        return len(self._rows)

    def encode(self, texts: Sequence[str]) -> Matrix:
        keys = [_digest(t) for t in texts]
        missing: dict[bytes, str] = {}
        for k, t in zip(keys, texts, strict=True):
            if k not in self._rows:
                missing.setdefault(k, t)
        todo = list(missing.items())
        for s in range(0, len(todo), SHARD):
            part = todo[s : s + SHARD]
            vecs = self.encoder.encode([t for _, t in part])
            karr = np.frombuffer(b"".join(k for k, _ in part), dtype=np.uint8).reshape(-1, 20)
            n = len(list(self.dir.glob("shard-*.npz")))
            tmp = self.dir / f"tmp-{n:05d}.npz"
            np.savez(tmp, keys=karr, vecs=vecs.astype(np.float32))
            tmp.replace(self.dir / f"shard-{n:05d}.npz")
            self._add(karr, vecs)
            if self.progress:
                self.progress(min(s + SHARD, len(todo)), len(todo))
        if not texts:
            return np.zeros((0, DIM), dtype=np.float32)
        if self._matrix is None:
            self._matrix = np.concatenate(self._vecs) if self._vecs else np.zeros((0, DIM), np.float32)
        return self._matrix[[self._rows[k] for k in keys]]
