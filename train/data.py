"""Question/answer data: loading, checking, and the deterministic held-out split.

Sources: a hub dataset id (default: the MedQuAD copy `keivalya/MedQuad-MedicalQnADataset`) or a
local `.csv`, `.csv.gz`, `.parquet` or `.jsonl` file with the columns qtype, Question and Answer
(matched case-insensitively).

The split is decided per question by a hash of its normalised text, so a question that occurs
several times (MedQuAD has 16,407 rows but 14,979 distinct questions) always lands on one side,
whatever qtype or row it appears in, and the split does not depend on row order or on the file.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from loraswap.adapters.prompt import normalize_question

DEFAULT_DATA = "keivalya/MedQuad-MedicalQnADataset"
COLUMNS = ("qtype", "Question", "Answer")
LOCAL_SUFFIXES = (".csv", ".csv.gz", ".parquet", ".jsonl")
DEFAULT_HELDOUT_FRACTION = 0.1


class DataError(ValueError):
    """The data cannot be used; the message names the problem and what was found."""


@dataclass(frozen=True)
class QA:
    qtype: str
    question: str
    answer: str


def load_qa(source: str) -> list[QA]:
    """Read every row of `source` (local file or hub id) as QA records, in file order."""
    path = Path(source).expanduser()
    local = path.exists() or source.endswith(LOCAL_SUFFIXES)
    frame = _read_local(path) if local else _read_hub(source)
    return _to_records(frame, path.name if path.exists() else source)


def _read_local(path: Path) -> pd.DataFrame:
    name = path.name
    if not path.is_file():
        raise DataError(f"data file {name!r} does not exist")
    if not name.endswith(LOCAL_SUFFIXES):
        raise DataError(f"data file {name!r}: unsupported format; use one of {', '.join(LOCAL_SUFFIXES)}")
    try:
        if name.endswith(".parquet"):
            return pd.read_parquet(path)
        if name.endswith(".jsonl"):
            return pd.read_json(path, lines=True, dtype=False, encoding="utf-8")
        return pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"data file {name!r} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    except pd.errors.EmptyDataError:
        raise DataError(f"data file {name!r} is empty") from None
    except (ValueError, OSError) as e:
        raise DataError(f"data file {name!r} could not be parsed: {e}") from None


def _read_hub(dataset_id: str) -> pd.DataFrame:
    import datasets

    try:
        ds = datasets.load_dataset(dataset_id, split="train")
    except Exception as e:  # datasets raises many types for offline / missing / gated sets
        raise DataError(f"could not load dataset {dataset_id!r} from the Hugging Face hub: {e}") from None
    frame: pd.DataFrame = ds.to_pandas()
    return frame


def _to_records(frame: pd.DataFrame, name: str) -> list[QA]:
    if frame.empty:
        raise DataError(f"data {name!r} has no rows (columns found: {list(map(str, frame.columns))})")
    by_lower = {str(c).strip().lower(): c for c in frame.columns}
    missing = [c for c in COLUMNS if c.lower() not in by_lower]
    if missing:
        raise DataError(
            f"data {name!r} lacks column(s) {missing}; found {list(map(str, frame.columns))} "
            "(needed: qtype, Question, Answer, any case)"
        )
    cols = [by_lower[c.lower()] for c in COLUMNS]
    records = []
    for q, question, answer in frame[cols].itertuples(index=False, name=None):
        if not isinstance(question, str) or not isinstance(answer, str) or not isinstance(q, str):
            continue
        if question.strip() and answer.strip() and q.strip():
            records.append(QA(q.strip(), question, answer))
    if not records:
        raise DataError(f"data {name!r} has {len(frame)} rows but none with a non-empty qtype, Question and Answer")
    return records


def qtype_counts(rows: list[QA]) -> Counter[str]:
    return Counter(r.qtype for r in rows)


def check_qtypes(rows: list[QA], wanted: list[str]) -> None:
    counts = qtype_counts(rows)
    unknown = [q for q in wanted if q not in counts]
    if unknown:
        found = ", ".join(f"{q} ({n})" for q, n in counts.most_common())
        raise DataError(f"unknown qtype(s) {unknown}; the data has: {found}")


def question_rank(question: str) -> float:
    """The first 8 bytes of sha256(normalised question) as a number in [0, 1): a stable pseudo-random draw."""
    digest = hashlib.sha256(normalize_question(question).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def is_heldout(question: str, fraction: float = DEFAULT_HELDOUT_FRACTION) -> bool:
    return question_rank(question) < fraction


@dataclass(frozen=True)
class Split:
    train: list[QA]
    heldout: list[QA]
    """Distinct questions, in a stable pseudo-random order: `heldout[:n]` is a fair sample."""

    @property
    def hash(self) -> str:
        """Identifies the held-out set: recorded in manifests so evaluations can be matched to training."""
        keys = sorted({normalize_question(r.question) for r in self.heldout})
        return hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]


def split(rows: list[QA], qtype: str | None = None, fraction: float = DEFAULT_HELDOUT_FRACTION) -> Split:
    """Train/held-out rows of one qtype (or all rows); the held-out side is deduplicated by question."""
    if not 0.0 < fraction < 1.0:
        raise DataError(f"held-out fraction must be in (0, 1), got {fraction}")
    chosen = [r for r in rows if qtype is None or r.qtype == qtype]
    train = [r for r in chosen if not is_heldout(r.question, fraction)]
    heldout: list[QA] = []
    seen: set[tuple[str, str]] = set()
    for r in chosen:
        key = (r.qtype, normalize_question(r.question))
        if is_heldout(r.question, fraction) and key not in seen:
            seen.add(key)
            heldout.append(r)
    # Ordered by hash, not by file order (MedQuAD is sorted by source collection), so that the first
    # N held-out questions are a fair sample of the qtype.
    heldout.sort(key=lambda r: question_rank(r.question))
    return Split(train, heldout)
