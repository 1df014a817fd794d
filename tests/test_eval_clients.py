"""lm-evaluation-harness, offline, through a running server on the real embedded base with the shipped adapters: a
log-likelihood task built here from held-out MedQuAD rows, scored through /v1/completions (`local-completions`:
echo + logprobs over token ids), where each adapter must score its own qtype's answers higher than the base does;
and a generate_until task through /v1/chat/completions (`local-chat-completions`)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from loraswap.adapters.base import load_tokenizer, resolve_base
from loraswap.adapters.prompt import normalize_answer, render_prompt
from loraswap.bench.launch import launch, stop
from loraswap.train.data import load_qa, split

pytestmark = pytest.mark.slow
QTYPES = ("symptoms", "treatment")
DOCS = 6
"""Held-out questions per qtype."""
ANSWER_CHARS = 240
"""Answers are cut to about this many characters (at a word): the score covers the answer's opening."""


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    # The shipped adapters come with the embedded base; the user store is empty. A dense base scores fastest here.
    proc, url = launch("embedded", tmp_path_factory.mktemp("eval-store"), quant="none", max_batch_size=8, timeout=600)
    yield url
    stop(proc)


@pytest.fixture(scope="module")
def tokenizer_dir() -> str:
    return str(resolve_base("embedded").load_path)


def _docs(medquad: Path, tokenizer: Any, qtype: str) -> list[dict[str, str]]:
    """Held-out rows of `qtype`: the prompt in the adapters' format (the context) and the answer's opening."""
    docs = []
    for row in split(load_qa(str(medquad)), qtype).heldout[:DOCS]:
        answer = normalize_answer(row.answer)
        cut = answer if len(answer) <= ANSWER_CHARS else answer[:ANSWER_CHARS].rsplit(" ", 1)[0]
        docs.append({"context": render_prompt(tokenizer, row.question), "answer": cut})
    return docs


def _evaluate(model: str, model_args: dict[str, Any], tasks: list[dict[str, Any]], **kwargs: Any) -> dict[str, Any]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    # The tasks are given whole here: without lm-eval's own thousands of task files to index (14 of a call's 16 s)
    tasks_only = TaskManager(include_defaults=False)
    results = lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=tasks,
        task_manager=tasks_only,
        log_samples=True,
        bootstrap_iters=0,
        **kwargs,
    )
    assert results is not None
    return results


def test_lm_eval_loglikelihood_each_adapter_beats_the_base_on_its_qtype(
    url: str, medquad: Path, tokenizer_dir: str, tmp_path: Path
) -> None:
    tokenizer = load_tokenizer(resolve_base("embedded"))
    tasks = {}
    for qtype in QTYPES:
        data = tmp_path / f"{qtype}.jsonl"
        data.write_text("".join(json.dumps(d) + "\n" for d in _docs(medquad, tokenizer, qtype)))
        tasks[qtype] = {
            "task": f"medquad_{qtype.replace(' ', '_')}",
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(data)}},
            "test_split": "test",
            "output_type": "loglikelihood",
            "doc_to_text": "{{context}}",
            "doc_to_target": "{{answer}}",
            "target_delimiter": "",
            "metric_list": [{"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False}],
        }
    scores: dict[str, dict[str, float]] = {qtype: {} for qtype in QTYPES}
    # each adapter scores its own qtype's task; the base scores both, in one run
    for model, qtypes in [*((qtype, [qtype]) for qtype in QTYPES), ("base", list(QTYPES))]:
        args = {
            "model": model,
            "base_url": f"{url}/v1/completions",
            "tokenizer_backend": "huggingface",
            "tokenizer": tokenizer_dir,
            "tokenized_requests": True,
            "max_retries": 1,
        }
        results = _evaluate("local-completions", args, [tasks[qtype] for qtype in qtypes], batch_size=3)
        for qtype in qtypes:
            samples = results["samples"][tasks[qtype]["task"]]
            assert len(samples) == DOCS
            lls = [float(s["filtered_resps"][0][0]) for s in samples]
            assert all(ll < 0 and ll == ll for ll in lls)  # real log-likelihoods, none NaN
            scores[qtype][model] = sum(lls) / len(lls)
    for qtype in QTYPES:
        print(f"lm-eval medquad_{qtype}: mean log-likelihood of {DOCS} held-out answers {scores[qtype]}")
        # The adapter was trained on this qtype's answers (other questions): it makes them more likely.
        assert scores[qtype][qtype] > scores[qtype]["base"], (qtype, scores[qtype])


def test_lm_eval_generate_until_through_chat_completions(url: str, medquad: Path, tmp_path: Path) -> None:
    rows = split(load_qa(str(medquad)), "symptoms").heldout[:3]
    data = tmp_path / "questions.jsonl"
    data.write_text("".join(json.dumps({"question": r.question, "answer": r.answer[:80]}) + "\n" for r in rows))
    task = {
        "task": "medquad_generate",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_text": "{{question}}",
        "doc_to_target": "{{answer}}",
        "generation_kwargs": {"until": ["\n\n"], "max_gen_toks": 16, "temperature": 0},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
    }
    args = {"model": "symptoms", "base_url": f"{url}/v1/chat/completions", "max_retries": 1}
    results = _evaluate("local-chat-completions", args, [task], apply_chat_template=True)
    samples = results["samples"]["medquad_generate"]
    assert len(samples) == 3
    answers = [s["resps"][0][0] for s in samples]
    assert all(isinstance(a, str) and a.strip() for a in answers), answers
    assert "exact_match,none" in results["results"]["medquad_generate"]
