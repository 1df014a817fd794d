"""Data loading, error messages, and the held-out split."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pandas as pd
import pytest
from conftest import qa_rows, write_qa_csv

from loraswap.adapters.prompt import normalize_answer, normalize_question
from loraswap.train.data import DataError, check_qtypes, is_heldout, load_qa, qtype_counts, split
from loraswap.train.trainer import TrainConfig, other_qtype_rows


def test_every_local_format_reads_the_same_rows(tmp_path: Path) -> None:
    rows = qa_rows()
    frame = pd.DataFrame(rows, columns=["QTYPE", "question", "ANSWER"])  # column case must not matter
    csv_path = write_qa_csv(tmp_path / "d.csv", rows, header=("QType", "QUESTION", "answer"))
    gz = tmp_path / "d.csv.gz"
    gz.write_bytes(gzip.compress(csv_path.read_bytes()))
    parquet = tmp_path / "d.parquet"
    frame.to_parquet(parquet)
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps({"qtype": q, "Question": s, "Answer": a}) + "\n" for q, s, a in rows))
    loaded = [load_qa(str(p)) for p in (csv_path, gz, parquet, jsonl)]
    assert all(len(x) == len(rows) for x in loaded)
    assert all([(r.qtype, r.question, r.answer) for r in x] == rows for x in loaded)


def test_missing_column_names_what_was_found(tmp_path: Path) -> None:
    p = write_qa_csv(tmp_path / "bad.csv", [("symptoms", "q?")], header=("qtype", "Question"))
    with pytest.raises(DataError, match=r"lacks column\(s\) \['Answer'\]; found \['qtype', 'Question'\]"):
        load_qa(str(p))


def test_empty_file(tmp_path: Path) -> None:
    p = tmp_path / "empty.csv"
    p.write_text("")
    with pytest.raises(DataError, match="is empty"):
        load_qa(str(p))
    p2 = write_qa_csv(tmp_path / "header-only.csv", [])
    with pytest.raises(DataError, match="no rows"):
        load_qa(str(p2))


def test_non_utf8_file(tmp_path: Path) -> None:
    p = tmp_path / "latin1.csv"
    p.write_bytes(
        "qtype,Question,Answer\nsymptoms,Qu'est-ce que la fièvre ?,Une température élevée\n".encode("latin-1")
    )
    with pytest.raises(DataError, match="not UTF-8"):
        load_qa(str(p))


def test_missing_file_and_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_qa(str(tmp_path / "nope.csv"))
    other = tmp_path / "data.xlsx"
    other.write_text("x")
    with pytest.raises(DataError, match="unsupported format"):
        load_qa(str(other))


def test_unknown_qtype_lists_the_known_ones(qa_csv: Path) -> None:
    rows = load_qa(str(qa_csv))
    with pytest.raises(DataError, match=r"unknown qtype\(s\) \['symptom'\]; the data has: symptoms \(40\), treatment"):
        check_qtypes(rows, ["symptom"])


def test_split_is_deterministic_and_by_question_text() -> None:
    assert is_heldout("What is X?") == is_heldout("  what IS   x? ")
    # About 10% of many distinct questions are held out.
    share = sum(is_heldout(f"question number {i}") for i in range(5000)) / 5000
    assert 0.08 < share < 0.12


def test_split_never_straddles_duplicates(medquad: Path) -> None:
    rows = load_qa(str(medquad))
    assert len(rows) == 16407
    for qtype in ("symptoms", "treatment", "information"):
        sp = split(rows, qtype)
        train_q = {normalize_question(r.question) for r in sp.train}
        held_q = {normalize_question(r.question) for r in sp.heldout}
        assert train_q.isdisjoint(held_q)
        assert len(held_q) == len(sp.heldout)  # held-out side is deduplicated
        n = qtype_counts(rows)[qtype]
        assert 0.05 * n < len(sp.heldout) < 0.15 * n
        assert split(rows, qtype).hash == sp.hash
    # The whole data set: no question on both sides, whatever qtype it appears under.
    whole = split(rows)
    assert {normalize_question(r.question) for r in whole.train}.isdisjoint(
        {normalize_question(r.question) for r in whole.heldout}
    )


def test_rows_of_other_qtypes_keep_every_held_out_question_out(medquad: Path) -> None:
    rows = load_qa(str(medquad))
    cfg = TrainConfig()
    mixed = other_qtype_rows(rows, "prevention", 300, cfg)
    assert len(mixed) == 300
    assert "prevention" not in {r.qtype for r in mixed}
    assert len({r.qtype for r in mixed}) > 5  # drawn from across the data set, not from one collection
    held = {normalize_question(r.question) for r in split(rows).heldout}
    assert not held & {normalize_question(r.question) for r in mixed}
    assert other_qtype_rows(rows, "prevention", 300, cfg) == mixed  # the same rows for the same seed
    assert other_qtype_rows(rows, "prevention", 300, TrainConfig(seed=1)) != mixed
    assert other_qtype_rows(rows, "prevention", 0, cfg) == []
    with pytest.raises(ValueError, match="other_rows must be 0 or more"):
        TrainConfig(other_rows=-0.5)


def test_loraplus_ratio_is_checked() -> None:
    with pytest.raises(ValueError, match="loraplus_ratio must be above 0"):
        TrainConfig(loraplus_ratio=0)
    with pytest.raises(ValueError, match="LoRA only, not to prefix"):
        TrainConfig(method="prefix", loraplus_ratio=4)
    assert TrainConfig(loraplus_ratio=16).describe()["loraplus_ratio"] == 16


def test_answers_are_normalised_for_training_not_on_disk(tmp_path: Path) -> None:
    raw = "First paragraph   line\n                \n                \n   - bullet one\n   - bullet  two  "
    p = write_qa_csv(tmp_path / "ws.csv", [("symptoms", "q?", raw)])
    before = p.read_bytes()
    row = load_qa(str(p))[0]
    assert row.answer == raw
    assert normalize_answer(row.answer) == "First paragraph line\n\n- bullet one\n- bullet two"
    assert p.read_bytes() == before


def test_bad_fraction_is_refused(qa_csv: Path) -> None:
    with pytest.raises(DataError, match=r"must be in \(0, 1\)"):
        split(load_qa(str(qa_csv)), "symptoms", fraction=1.5)
