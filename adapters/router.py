"""The qtype router behind `"adapter": "auto"`: which kind of question is this?

What an adapter store knows about its adapters: which qtype each question belongs to, so the adapter trained
for that qtype can answer it. TF-IDF over word unigrams and bigrams with a multinomial logistic regression,
saved as plain JSON (vocabulary, idf, weights), never as a pickle, and applied with numpy, so the server needs no
scikit-learn and loads nothing that could run code. Training it is `loraswap.train.router`.
"""

from __future__ import annotations

import itertools
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

_TOKEN = re.compile(r"(?u)\b\w\w+\b")  # scikit-learn's default token pattern


def terms(text: str) -> list[str]:
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
    # Held-out accuracy of each qtype on its own questions (recall), as trained.
    per_qtype: dict[str, float] = field(default_factory=dict)

    def features(self, question: str) -> np.ndarray:
        x = np.zeros(len(self.vocab))
        for term, n in Counter(terms(question)).items():
            if term in self.vocab:
                x[self.vocab[term]] = n
        x *= self.idf
        norm = np.linalg.norm(x)
        return x / norm if norm else x

    def predict(self, question: str) -> tuple[str, float]:
        """The most likely qtype and its probability."""
        return self.ranked(question)[0]

    def ranked(self, question: str) -> list[tuple[str, float]]:
        """Every qtype with its probability, the most likely first."""
        scores = self.coef @ self.features(question) + self.intercept
        probs = np.exp(scores - scores.max())
        probs /= probs.sum()
        return [(self.classes[i], float(probs[i])) for i in np.argsort(-probs, kind="stable")]

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
            "per_qtype": self.per_qtype,
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
            dict(blob.get("per_qtype") or {}),
        )
