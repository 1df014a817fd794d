"""The qtype router behind adapter 'auto'."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import qa_rows

from loraswap.adapters.router import Router
from loraswap.adapters.store import SHIPPED_DIR, AdapterStore
from loraswap.train.data import QA, load_qa, split
from loraswap.train.router import train_router


def test_router_learns_and_round_trips_through_json(tmp_path: Path) -> None:
    rows = [QA(*r) for r in qa_rows()]
    router = train_router(rows, min_rows=1)
    assert router.classes == ["symptoms", "treatment"]
    assert router.predict("What are the symptoms of gastritis ?")[0] == "symptoms"
    assert router.predict("What are the treatments for gastritis ?")[0] == "treatment"
    path = tmp_path / "router.json"
    router.save(path)
    assert json.loads(path.read_text())["kind"] == "tfidf-logreg"  # plain JSON, no pickle
    again = Router.load(path)
    for q, *_ in qa_rows():
        assert again.predict(q)[0] == router.predict(q)[0]
    with pytest.raises(ValueError, match="not a loraswap router"):
        (tmp_path / "other.json").write_text("{}")
        Router.load(tmp_path / "other.json")


@pytest.mark.slow
def test_shipped_router_is_accurate_on_held_out_medquad(medquad: Path) -> None:
    path = AdapterStore(Path("/nonexistent"), SHIPPED_DIR).router_path()
    assert path is not None
    router = Router.load(path)
    held = [r for r in split(load_qa(str(medquad))).heldout if r.qtype in router.classes]
    hits = sum(router.predict(r.question)[0] == r.qtype for r in held)
    assert hits / len(held) >= 0.95
    assert router.accuracy == pytest.approx(hits / len(held), abs=0.002)
