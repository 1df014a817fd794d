"""The shipped adapters: one per MedQuAD qtype with at least 200 rows, each valid on the embedded base, small,
carrying its held-out figures, and better than the base on its own qtype's held-out questions."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from loraswap.adapters.base import EMBEDDED_ID, load_base
from loraswap.adapters.manifest import qtype_to_name, read_manifest
from loraswap.adapters.router import Router
from loraswap.adapters.store import SHIPPED_DIR, AdapterStore, StoreEntry
from loraswap.adapters.validate import validate_adapter
from loraswap.train.data import load_qa, split
from loraswap.train.evaluate import BASE, answer_nll, using

pytestmark = pytest.mark.slow

# The size budget of one shipped adapter's weights (README, Shipped adapters).
WEIGHTS_BUDGET = 10_000_000
# The goal each shipped adapter's recorded figure meets: a held-out answer NLL at least 25% below the base's.
GOAL = -0.25
HELDOUT = 64
# Qtypes with at least 200 rows that no shipped adapter serves yet (`auto` answers them with the base), and shipped
# adapters whose recorded change misses GOAL (README, Shipped adapters, says what each reaches and what was tried).
UNSHIPPED: set[str] = set()
BELOW_GOAL: set[str] = {"causes", "prevention"}


@pytest.fixture(scope="module")
def nf4():  # type: ignore[no-untyped-def]
    return load_base("embedded", quant="nf4")


@pytest.fixture(scope="module")
def shipped() -> dict[str, StoreEntry]:
    return AdapterStore(Path("/nonexistent"), SHIPPED_DIR).entries()


@pytest.fixture(scope="module")
def rows(medquad: Path) -> list[Any]:
    return load_qa(str(medquad))


def big_qtypes(rows: list[Any]) -> list[str]:
    counts = Counter(r.qtype for r in rows)
    return sorted(q for q, n in counts.items() if n >= 200)


def test_every_qtype_with_200_rows_has_a_shipped_adapter(shipped: dict[str, StoreEntry], rows: list[Any]) -> None:
    qtypes = big_qtypes(rows)
    assert len(qtypes) == 13
    missing = {q for q in qtypes if qtype_to_name(q) not in shipped}
    assert missing == UNSHIPPED, f"no shipped adapter for {sorted(missing)}; UNSHIPPED says {sorted(UNSHIPPED)}"
    for q in set(qtypes) - missing:
        assert shipped[qtype_to_name(q)].manifest.qtype == q


def test_shipped_adapters_are_valid_small_and_carry_their_figures(
    nf4, shipped: dict[str, StoreEntry], rows: list[Any]
) -> None:  # type: ignore[no-untyped-def]
    for name, e in shipped.items():
        assert e.source == "shipped"
        assert validate_adapter(e.path, nf4.ref) == [], name
        assert (e.path / "adapter_model.safetensors").stat().st_size <= WEIGHTS_BUDGET, name
        config = json.loads((e.path / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == EMBEDDED_ID  # no path of the machine it was trained on
        m = read_manifest(e.path).metrics
        available = len(split(rows, e.manifest.qtype).heldout)
        assert m["heldout_n"] == min(HELDOUT, available), name
        low, high = m["nll_change_ci95"]
        assert low <= m["nll_change"] <= high, name
        if name in BELOW_GOAL:
            assert GOAL < m["nll_change"] < 0, f"{name} is listed below the goal: {m['nll_change']:+.1%}"
        else:
            assert m["nll_change"] <= GOAL, f"{name}: {m['nll_change']:+.1%} misses the goal of {GOAL:+.0%}"
        assert m["nll"] < m["base_nll"], name


def test_each_shipped_adapter_beats_the_base_on_its_own_held_out_questions(
    nf4, shipped: dict[str, StoreEntry], rows: list[Any]
) -> None:  # type: ignore[no-untyped-def]
    from peft import PeftModel

    from loraswap.server.worker import fastpath

    fastpath.lean_4bit(nf4.model, "auto")  # the server's 4-bit kernel for this CPU: the answers as it scores them
    entries = sorted(shipped.values(), key=lambda e: e.name)
    model = PeftModel.from_pretrained(nf4.model, str(entries[0].path), adapter_name=entries[0].name)
    for e in entries[1:]:
        model.load_adapter(str(e.path), adapter_name=e.name)
    model.eval()
    worse = []
    for e in entries:
        held = split(rows, e.manifest.qtype).heldout[:8]
        with using(model, BASE) as m:
            base = answer_nll(m, nf4.tokenizer, held)
        with using(model, e.name) as m:
            mine = answer_nll(m, nf4.tokenizer, held)
        if not mine < base:
            worse.append(f"{e.name}: {mine:.3f} vs base {base:.3f}")
    assert not worse, worse


def test_the_router_knows_every_shipped_qtype(shipped: dict[str, StoreEntry]) -> None:
    router = Router.load(SHIPPED_DIR / "router.json")
    qtypes = {e.manifest.qtype for e in shipped.values()}
    assert qtypes <= set(router.classes)
    assert qtypes <= set(router.per_qtype)
    assert all(0.0 <= router.per_qtype[q] <= 1.0 for q in qtypes)


# The example questions of MedQuAD's source page on Lymphocytic Choriomeningitis, with their qtypes.
SOURCE_QUESTIONS = [
    ("Who is at risk for Lymphocytic Choriomeningitis (LCM)? ?", "susceptibility"),
    ("What are the symptoms of Lymphocytic Choriomeningitis (LCM) ?", "symptoms"),
    ("How to diagnose Lymphocytic Choriomeningitis (LCM) ?", "exams and tests"),
    ("What are the treatments for Lymphocytic Choriomeningitis (LCM) ?", "treatment"),
    ("How to prevent Lymphocytic Choriomeningitis (LCM) ?", "prevention"),
]


def test_auto_answers_the_source_questions_with_their_qtype_adapters(tmp_path: Path) -> None:
    import httpx

    from loraswap.bench.launch import launch, stop

    proc, url = launch("embedded", tmp_path / "user-adapters", max_batch_size=4, timeout=300)
    try:
        for question, qtype in SOURCE_QUESTIONS:
            ask = {"adapter": "auto", "question": question, "max_tokens": 4}
            r = httpx.post(f"{url}/v1/answer", json=ask, timeout=120)
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["routed"]["qtype"] == qtype, question
            assert body["adapter"] == qtype_to_name(qtype), body
    finally:
        stop(proc)
