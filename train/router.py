"""Training the qtype router (`loraswap.adapters.router.Router`) on the training split, scored on the held-out one.

scikit-learn fits it here; what it learned is stored as plain numbers, so serving needs no scikit-learn.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from loraswap.adapters.router import Router, terms
from loraswap.train.data import QA, split


def train_router(rows: list[QA], min_rows: int = 50, max_features: int = 4000) -> Router:
    """Fit on the training split of every qtype with at least `min_rows` rows; accuracy on the held-out split, in all
    and per qtype."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    counts = Counter(r.qtype for r in rows)
    kept = [r for r in rows if counts[r.qtype] >= min_rows]
    sp = split(kept)
    vectorizer = TfidfVectorizer(min_df=2, max_features=max_features, analyzer=terms)
    x = vectorizer.fit_transform([r.question for r in sp.train])
    model = LogisticRegression(max_iter=2000, C=10.0)
    model.fit(x, [r.qtype for r in sp.train])
    vocab = {str(k): int(v) for k, v in vectorizer.vocabulary_.items()}
    coef, intercept = model.coef_, model.intercept_
    if coef.shape[0] == 1:  # two classes: scikit-learn keeps one row, P(second) = sigmoid(w.x + b)
        coef, intercept = np.vstack([np.zeros_like(coef), coef]), np.concatenate([[0.0], intercept])
    router = Router(list(map(str, model.classes_)), vocab, vectorizer.idf_, coef, intercept)
    right: Counter[str] = Counter()
    asked = Counter(r.qtype for r in sp.heldout)
    for r in sp.heldout:
        right[r.qtype] += router.predict(r.question)[0] == r.qtype
    router.accuracy = round(sum(right.values()) / len(sp.heldout), 4)
    router.heldout_n = len(sp.heldout)
    router.per_qtype = {q: round(right[q] / asked[q], 4) for q in sorted(asked)}
    return router
