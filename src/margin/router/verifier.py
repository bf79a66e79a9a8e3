"""A learned cascade verifier: after the cheap model answers, is its answer right, and would the
strong model do better? (FrugalGPT's scorer, AutoMix's self-verification, learned from data.)

``AnswerVerifier`` holds two predictors:
- P(cheap answer right | question, answer): logistic regression over TF-IDF word 1-2-grams of
  ``question ||| answer`` and the standardised checks of ``margin.router.answer_check`` (arithmetic
  that does not hold, unused quantities, missing final answer, ...);
- P(strong model right | question): the prompt-only router (``TfidfLR``).
``margin.policy.verify`` escalates when the second minus the first exceeds the operating point.

Artefact: a directory with ``manifest.json`` (``format_version``, ``kind: cascade-verifier``,
``cheap``, ``strong``, ``operating_point`` {rule: gain_threshold, value, target_quality, ...},
``costs``, ``training``, library versions) and ``verifier.joblib`` (a pickle: load only
artefacts you built). ``load_verifier(path).check(question, answer)`` -> (accepted, why).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import sparse
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression

from margin import artefacts
from margin.policy.verify import verdict
from margin.router.answer_check import FEATURES, features
from margin.router.train import TfidfLR

Array = npt.NDArray[np.float64]
FORMAT_VERSION = 1
KIND = "cascade-verifier"
MODEL_FILE = "verifier.joblib"
SEP = " ||| "


class VerifierError(Exception):
    """Missing, malformed or incompatible verifier artefact, or data without answers."""


FORMAT = artefacts.Format("cascade verifier", MODEL_FILE, FORMAT_VERSION, "margin router cascade-train",
                          VerifierError, KIND)


@dataclass
class AnswerVerifier:
    cheap: str
    strong: str
    C: float = 1.0
    max_features: int = 50_000
    vectorizer: TfidfVectorizer | None = None
    mu: Array = field(default_factory=lambda: np.zeros(0))
    sd: Array = field(default_factory=lambda: np.ones(0))
    clf: LogisticRegression | None = None
    strong_router: TfidfLR | None = None

    def describe(self) -> dict[str, Any]:
        return {"cheap_ok": {"text": "TF-IDF word 1-2-grams of question ||| answer", "checks": list(FEATURES),
                             "classifier": "LogisticRegression", "C": self.C},
                "strong_ok": {"kind": "tfidf-lr", "input": "question only"}}

    def _X(self, prompts: Sequence[str], answers: Sequence[str]) -> sparse.csr_matrix:
        assert self.vectorizer is not None
        H = (np.asarray([features(p, a) for p, a in zip(prompts, answers, strict=True)]) - self.mu) / self.sd
        text = self.vectorizer.transform([p + SEP + a for p, a in zip(prompts, answers, strict=True)])
        return sparse.hstack([text, sparse.csr_matrix(H)]).tocsr()

    def fit(self, prompts: Sequence[str], answers: Sequence[str], cheap_ok: Array, strong_ok: Array
            ) -> AnswerVerifier:
        y = (np.asarray(cheap_ok) >= 0.5).astype(np.int64)
        if len(y) == 0 or y.min() == y.max():
            raise VerifierError("the cheap model's answers are all right or all wrong: nothing to learn")
        H = np.asarray([features(p, a) for p, a in zip(prompts, answers, strict=True)])
        self.mu, self.sd = H.mean(axis=0), H.std(axis=0) + 1e-9
        self.vectorizer = TfidfVectorizer(ngram_range=(1, 2), min_df=min(2, max(1, len(prompts) // 50)),
                                          sublinear_tf=True, max_features=self.max_features, dtype=np.float32)
        self.vectorizer.fit([p + SEP + a for p, a in zip(prompts, answers, strict=True)])
        self.clf = LogisticRegression(C=self.C, max_iter=3000).fit(self._X(prompts, answers), y)
        self.strong_router = TfidfLR([self.cheap, self.strong]).fit(
            prompts, np.stack([np.asarray(cheap_ok), np.asarray(strong_ok)], axis=1))
        return self

    def predict_many(self, prompts: Sequence[str], answers: Sequence[str]) -> tuple[Array, Array]:
        """(P(cheap answer right), P(strong model right)) per query."""
        if self.clf is None or self.strong_router is None:
            raise RuntimeError("verifier is not fitted")
        pc = self.clf.predict_proba(self._X(prompts, answers))[:, 1]
        ps = self.strong_router.predict_many(prompts)[:, 1]
        return np.asarray(pc, dtype=np.float64), np.asarray(ps, dtype=np.float64)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_fast", None)  # rebuilt on first use
        return state

    def _fast_path(self) -> tuple[Any, dict[str, int], Array, Array, Array]:
        fast: tuple[Any, dict[str, int], Array, Array, Array] | None = self.__dict__.get("_fast")
        if fast is None:
            if self.vectorizer is None or self.clf is None:
                raise RuntimeError("verifier is not fitted")
            v, w = self.vectorizer, np.asarray(self.clf.coef_[0], dtype=np.float64)
            n_text = len(v.vocabulary_)
            fast = (v.build_analyzer(), dict(v.vocabulary_), np.asarray(v.idf_, dtype=np.float64), w[:n_text],
                    w[n_text:] / self.sd)
            self.__dict__["_fast"] = fast
        return fast

    def predict(self, prompt: str, answer: str) -> tuple[float, float]:
        """``predict_many`` for one query without scikit-learn's per-call overhead (same TF-IDF:
        sublinear tf, smoothed idf, l2 norm; same standardised checks)."""
        if self.clf is None or self.strong_router is None:
            raise RuntimeError("verifier is not fitted")
        analyzer, vocab, idf, w_text, w_checks = self._fast_path()
        counts: dict[int, int] = {}
        for tok in analyzer(prompt + SEP + answer):
            j = vocab.get(tok)
            if j is not None:
                counts[j] = counts.get(j, 0) + 1
        z = float(self.clf.intercept_[0]) + float((np.asarray(features(prompt, answer)) - self.mu) @ w_checks)
        if counts:
            idx = np.fromiter(counts.keys(), dtype=np.int64, count=len(counts))
            val = (1.0 + np.log(np.fromiter(counts.values(), dtype=np.float64, count=len(counts)))) * idf[idx]
            z += float(val @ w_text[idx]) / float(np.sqrt(val @ val))
        return float(1.0 / (1.0 + np.exp(-z))), float(self.strong_router.predict_vector(prompt)[1])


@dataclass
class LoadedVerifier:
    """What a cascade calls on the cheap answer: ``check(question, answer)`` -> (accepted, why)."""

    manifest: dict[str, Any]
    model: AnswerVerifier

    @property
    def operating_point(self) -> dict[str, Any]:
        return dict(self.manifest["operating_point"])

    @property
    def cheap(self) -> str:
        return self.model.cheap

    @property
    def strong(self) -> str:
        return self.model.strong

    def predict(self, question: str, answer: str) -> tuple[float, float]:
        return self.model.predict(question, answer)

    def check(self, question: str, answer: str) -> tuple[bool, str]:
        pc, ps = self.model.predict(question, answer)
        return verdict(pc, ps, float(self.operating_point["value"]))


def save_verifier(model: AnswerVerifier, out: Path, *, operating_point: Mapping[str, Any],
                  costs: Mapping[str, float], training: Mapping[str, Any]) -> Path:
    return artefacts.save(FORMAT, model, out, {
        "cheap": model.cheap, "strong": model.strong, "features": model.describe(),
        "operating_point": dict(operating_point), "costs": {k: float(v) for k, v in costs.items()},
        "training": dict(training),
    })


def _operating_point(manifest: dict[str, Any], f: Path) -> None:
    op = manifest.get("operating_point")
    if not isinstance(op, dict) or not isinstance(op.get("value"), int | float):
        raise VerifierError(f"{f}: manifest has no numeric operating_point.value")


def load_verifier(path: str | Path) -> LoadedVerifier:
    manifest, model, d = artefacts.load(FORMAT, path, check=_operating_point)
    if not isinstance(model, AnswerVerifier):
        raise VerifierError(f"{d}: {MODEL_FILE} holds a {type(model).__name__}, not a verifier")
    if (model.cheap, model.strong) != (manifest.get("cheap"), manifest.get("strong")):
        raise VerifierError(f"{d}: manifest models differ from the fitted ones")
    return LoadedVerifier(manifest, model)
