"""The qtype router behind `"adapter": "auto"`: which kind of question is this?

TF-IDF over word unigrams and bigrams with a multinomial logistic regression (scikit-learn), trained
on the training split. It is saved as plain JSON (vocabulary, idf, weights), never as a pickle, and
applied with numpy, so the server needs no scikit-learn and loads nothing that could run code.
"""

from __future__ import annotations

import itertools
import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from loraswap.train.data import QA, split

_TOKEN = re.compile(r"(?u)\b\w\w+\b")  # scikit-learn's default token pattern


def _terms(text: str) -> list[str]:
    tokens = _TOKEN.findall(text.lower())
    return tokens + [f"{a} {b}" for a, b in itertools.pairwise(tokens)]


@dataclass
class Router:
    classes: list[str]
    vocab: dict[str, int]
    idf: np.ndarray
    coef: np.ndarray  # [classes, vocab]
    intercept: np.ndarray  # [classes]
    accuracy: float | None = None
    heldout_n: int | None = None

    def features(self, question: str) -> np.ndarray:
        x = np.zeros(len(self.vocab))
        for term, n in Counter(_terms(question)).items():
            if term in self.vocab:
                x[self.vocab[term]] = n
        x *= self.idf
        norm = np.linalg.norm(x)
        return x / norm if norm else x

    def predict(self, question: str) -> tuple[str, float]:
        """The most likely qtype and its probability."""
        scores = self.coef @ self.features(question) + self.intercept
        probs = np.exp(scores - scores.max())
        probs /= probs.sum()
        best = int(probs.argmax())
        return self.classes[best], float(probs[best])

    def save(self, path: Path) -> None:
        blob = {
            "kind": "tfidf-logreg",
            "classes": self.classes,
            "vocab": self.vocab,
            "idf": [round(float(v), 6) for v in self.idf],
            "coef": [[round(float(v), 5) for v in row] for row in self.coef],
            "intercept": [round(float(v), 6) for v in self.intercept],
            "accuracy": self.accuracy,
            "heldout_n": self.heldout_n,
        }
        path.write_text(json.dumps(blob, separators=(",", ":")) + "\n")

    @classmethod
    def load(cls, path: Path) -> Router:
        blob: dict[str, Any] = json.loads(path.read_text())
        if blob.get("kind") != "tfidf-logreg":
            raise ValueError(f"{path.name} is not a loraswap router")
        return cls(
            blob["classes"],
            blob["vocab"],
            np.asarray(blob["idf"]),
            np.asarray(blob["coef"]),
            np.asarray(blob["intercept"]),
            blob.get("accuracy"),
            blob.get("heldout_n"),
        )


def train_router(rows: list[QA], min_rows: int = 50, max_features: int = 4000) -> Router:
    """Fit on the training split of every qtype with at least `min_rows` rows; accuracy on the held-out split."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    counts = Counter(r.qtype for r in rows)
    kept = [r for r in rows if counts[r.qtype] >= min_rows]
    sp = split(kept)
    vectorizer = TfidfVectorizer(min_df=2, max_features=max_features, analyzer=_terms)
    x = vectorizer.fit_transform([r.question for r in sp.train])
    model = LogisticRegression(max_iter=2000, C=10.0)
    model.fit(x, [r.qtype for r in sp.train])
    vocab = {str(k): int(v) for k, v in vectorizer.vocabulary_.items()}
    coef, intercept = model.coef_, model.intercept_
    if coef.shape[0] == 1:  # two classes: scikit-learn keeps one row, P(second) = sigmoid(w.x + b)
        coef, intercept = np.vstack([np.zeros_like(coef), coef]), np.concatenate([[0.0], intercept])
    router = Router(list(map(str, model.classes_)), vocab, vectorizer.idf_, coef, intercept)
    hits = sum(router.predict(r.question)[0] == r.qtype for r in sp.heldout)
    router.accuracy = round(hits / len(sp.heldout), 4)
    router.heldout_n = len(sp.heldout)
    return router
