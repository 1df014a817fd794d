"""The proof of `loraswap export --format gguf`: llama.cpp runs the embedded base's GGUF with each exported
adapter, and what it computes agrees with loraswap's PEFT output for the same prompts.

The reference is PEFT on loraswap's dense base, which is the embedded Q4_1 GGUF dequantized to float32:
the very weights the GGUF holds (loraswap's NF4 load re-quantizes them into another model, so it is not
the fair reference). llama.cpp runs two copies of the base:

- float32: the shipped GGUF with every tensor dequantized to float32, metadata and tokenizer copied.
  Both sides compute in float32 on the same weights, so they must agree closely: next-token logits within
  F32_LOGIT_TOL (measured: at most 0.0122, on logits spanning about -6..31) and greedy answers token for
  token, also through llama-cpp-python's chat API with loraswap's system prompt.
- Q4_1, as shipped: the file the exported Modelfile names and Ollama runs. llama.cpp multiplies its 4-bit
  weights with activations rounded to 8 bits (Q8_1), which moves logits by up to 1.86 here, but the gap
  between PEFT's top two tokens by at most 0.36, and greedy choices differed only where PEFT's top two were
  within 0.26 of each other. Checked along PEFT's greedy answer (teacher-forced): logits within
  Q4_LOGIT_TOL; llama.cpp picks PEFT's token wherever PEFT's choice leads its runner-up by more than
  MARGIN; the adapter's effect (adapter minus base logits, in which much of the quantization noise
  cancels) correlates with PEFT's at EFFECT_MIN_CORR or more (measured 0.9896-0.9960); and the adapter
  changes llama.cpp's answers from the base's.

Figures: `pytest -s tests/test_export_llama_cpp.py` prints them for each case (2 shipped adapters x 2
questions x 16 answer tokens, plus an adapter on every linear layer).

llama-cpp-python is the `reference` extra; `make test` builds it once (`make llama-cpp`). Without it these
tests fail rather than skip, so that a run which did not prove the export never looks like one that did.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_export import ALL_LINEAR, make_adapter

from loraswap.adapters.base import embedded_gguf_path, load_base, resolve_base
from loraswap.adapters.export import export_adapter
from loraswap.adapters.prompt import SYSTEM_PROMPT, prompt_ids, render_prompt, stop_token_ids
from loraswap.adapters.store import SHIPPED_DIR
from loraswap.train.evaluate import BASE, using

try:
    import llama_cpp
except ImportError:  # pragma: no cover - the message is the point
    pytest.fail(
        "llama-cpp-python is not installed; `make llama-cpp` builds it once into .cache/wheels (make test does)",
        pytrace=False,
    )

pytestmark = pytest.mark.slow

F32_LOGIT_TOL = 0.05
Q4_LOGIT_TOL = 3.0
MARGIN = 1.5
EFFECT_MIN_CORR = 0.97
ADAPTERS = ("symptoms", "inheritance")
QUESTIONS = ("What are the symptoms of Marfan syndrome?", "Is cystic fibrosis inherited?")
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def every_linear(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random adapter of the embedded base on every linear layer, so on q and k too."""
    store = tmp_path_factory.mktemp("llama-cpp-store")
    return make_adapter("embedded", store, "every-linear", seed=11, b_scale=0.2, target_modules=ALL_LINEAR)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, every_linear: Path) -> dict[str, Path]:
    """The shipped adapters and `every_linear` as GGUF files."""
    ref = resolve_base("embedded")
    files = {}
    for name, folder in [(a, SHIPPED_DIR / a) for a in ADAPTERS] + [("every-linear", every_linear)]:
        out = tmp_path_factory.mktemp(f"gguf-{name}")
        export_adapter(folder, ref, "gguf", out / "export", progress=False)
        files[name] = out / "export" / f"{name}.gguf"
    return files


@pytest.fixture(scope="module")
def peft(every_linear: Path) -> Any:
    """PEFT on the dense embedded base, holding every adapter (switched with `using`; one test at a time)."""
    from peft import PeftModel

    base = load_base("embedded", quant="none")
    model = PeftModel.from_pretrained(base.model, str(SHIPPED_DIR / ADAPTERS[0]), adapter_name=ADAPTERS[0])
    for name in ADAPTERS[1:]:
        model.load_adapter(str(SHIPPED_DIR / name), adapter_name=name)
    model.load_adapter(str(every_linear), adapter_name="every-linear")
    model.eval()
    model.tokenizer = base.tokenizer
    return model


@pytest.fixture(scope="module")
def f32_gguf(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The embedded GGUF with every tensor dequantized to float32 (about 540 MB; removed afterwards)."""
    import gguf

    path = tmp_path_factory.mktemp("f32-base") / "base-f32.gguf"
    reader = gguf.GGUFReader(str(embedded_gguf_path()))
    writer = gguf.GGUFWriter(path, str(reader.fields["general.architecture"].contents()))
    for field in reader.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue
        kind = field.types[0]
        value = int(gguf.LlamaFileType.ALL_F32) if field.name == "general.file_type" else field.contents()
        writer.add_key_value(
            field.name, value, kind, sub_type=field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        )
    for t in reader.tensors:
        writer.add_tensor(t.name, gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    yield path
    path.unlink()


class LlamaCpp:
    """One llama.cpp model (a base GGUF, optionally with an adapter): logits and greedy tokens. One thread:
    on a busy 2-core machine a second one slowed llama.cpp down here."""

    def __init__(self, gguf: Path, adapter: Path | None) -> None:
        self.llm = llama_cpp.Llama(
            model_path=str(gguf),
            lora_path=str(adapter) if adapter else None,
            n_ctx=256,
            n_batch=256,
            n_threads=1,
            logits_all=True,
            verbose=False,
        )

    def logits(self, ids: list[int], answer: Sequence[int] = ()) -> np.ndarray:
        """Next-token logits after the prompt, then after each answer token but the last (teacher forcing)."""
        self.llm.reset()
        self.llm.eval(ids + list(answer[:-1]))
        return np.array(self.llm.scores[len(ids) - 1 : len(ids) + max(len(answer) - 1, 0)])

    def greedy(self, ids: list[int], n: int, stops: list[int]) -> list[int]:
        self.llm.reset()
        self.llm.eval(ids)
        out: list[int] = []
        for _ in range(n):
            token = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            if token in stops:
                break
            out.append(token)
            self.llm.eval([token])
        return out

    def close(self) -> None:
        self.llm.close()


class Reference:
    """PEFT's answers on the dense base, computed once per (adapter, question): the greedy answer and the
    logits before each of its tokens (the first row: the next-token logits after the prompt)."""

    def __init__(self, peft: Any) -> None:
        self.peft = peft
        self.tokenizer = peft.tokenizer
        self.stops = stop_token_ids(peft.tokenizer)
        self.done: dict[tuple[str, str], tuple[list[int], np.ndarray]] = {}

    def __call__(self, adapter: str, question: str) -> tuple[list[int], list[int], np.ndarray]:
        """(prompt ids, greedy answer ids, logits [answer length or 1, vocab])."""
        ids = prompt_ids(self.tokenizer, question)
        if (adapter, question) not in self.done:
            x = torch.tensor([ids])
            with torch.inference_mode(), using(self.peft, adapter) as model:
                out = model.generate(
                    input_ids=x,
                    attention_mask=torch.ones_like(x),
                    max_new_tokens=NEW_TOKENS,
                    do_sample=False,
                    eos_token_id=self.stops,
                    pad_token_id=self.tokenizer.pad_token_id,
                )
                answer = [t for t in out[0, len(ids) :].tolist() if t not in self.stops]
                logits = model(torch.tensor([ids + answer[:-1]])).logits[0, len(ids) - 1 :].numpy()
            self.done[adapter, question] = (answer, logits)
        return ids, *self.done[adapter, question]


@pytest.fixture(scope="module")
def reference(peft: Any) -> Reference:
    return Reference(peft)


def top_two_gap(want: np.ndarray, got: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: how far PEFT's top token leads its runner-up, and how much llama.cpp moved that gap."""
    order = np.argsort(want, axis=-1)
    rows = np.arange(len(want))
    first, second = order[:, -1], order[:, -2]
    gap = want[rows, first] - want[rows, second]
    return gap, np.abs(gap - (got[rows, first] - got[rows, second]))


def test_llama_cpp_tokenizes_the_prompt_as_loraswap_does(reference: Reference) -> None:
    llm = LlamaCpp(embedded_gguf_path(), None)
    for q in QUESTIONS:
        text = render_prompt(reference.tokenizer, q).encode()
        assert llm.llm.tokenize(text, add_bos=False, special=True) == prompt_ids(reference.tokenizer, q)
    llm.close()


@pytest.fixture(scope="module")
def f32_base_answers(f32_gguf: Path, reference: Reference) -> Iterator[dict[str, list[int]]]:
    """llama.cpp's greedy answers on the float32 base without an adapter, checked against PEFT's base."""
    base = LlamaCpp(f32_gguf, None)
    answers = {}
    for q in QUESTIONS:
        ids, answer, logits = reference(BASE, q)
        assert np.abs(base.logits(ids) - logits[0]).max() <= F32_LOGIT_TOL
        answers[q] = base.greedy(ids, NEW_TOKENS, reference.stops)
        assert answers[q] == answer
    base.close()
    yield answers


@pytest.mark.parametrize("adapter", [*ADAPTERS, "every-linear"])
def test_float32_llama_cpp_matches_peft(
    adapter: str,
    exported: dict[str, Path],
    f32_gguf: Path,
    reference: Reference,
    f32_base_answers: dict[str, list[int]],
) -> None:
    """Logits within F32_LOGIT_TOL and the same greedy answer, which differs from the base's; `every-linear`
    adapts q, k (9 query heads, 3 key/value heads), v, o and the MLP, so a wrong q/k row order or tensor name
    would show."""
    llm = LlamaCpp(f32_gguf, exported[adapter])
    for q in QUESTIONS:
        ids, answer, logits = reference(adapter, q)
        got = llm.logits(ids)[0]
        print(f"{adapter}, {q!r}: largest logit difference {np.abs(got - logits[0]).max():.4f}")
        assert np.abs(got - logits[0]).max() <= F32_LOGIT_TOL
        assert llm.greedy(ids, NEW_TOKENS, reference.stops) == answer, q
        assert answer != f32_base_answers[q]  # the adapter changes llama.cpp's answer
    llm.close()


def test_the_chat_api_with_loraswaps_system_prompt_gives_the_same_answer(
    exported: dict[str, Path], f32_gguf: Path, reference: Reference
) -> None:
    """What the exported README tells llama.cpp users to run answers as loraswap does."""
    llm = LlamaCpp(f32_gguf, exported[ADAPTERS[0]])
    q = QUESTIONS[0]
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": q}]
    reply: Any = llm.llm.create_chat_completion(messages=messages, temperature=0.0, max_tokens=NEW_TOKENS)
    _, answer, _ = reference(ADAPTERS[0], q)
    assert reply["choices"][0]["message"]["content"] == reference.tokenizer.decode(answer)
    llm.close()


def test_without_the_qk_row_order_llama_cpp_disagrees(
    every_linear: Path, f32_gguf: Path, reference: Reference, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The control for the test above: the same adapter exported without reordering q/k rows is wrong in
    llama.cpp, so agreement there is evidence of the reordering, not of a lenient tolerance."""
    from loraswap.adapters import gguf_export

    monkeypatch.setattr(gguf_export, "interleave_rope_rows", lambda b, n_heads: b)
    export_adapter(every_linear, resolve_base("embedded"), "gguf", tmp_path / "unpermuted", progress=False)
    llm = LlamaCpp(f32_gguf, tmp_path / "unpermuted" / "every-linear.gguf")
    ids, _, logits = reference("every-linear", QUESTIONS[0])
    off = float(np.abs(llm.logits(ids)[0] - logits[0]).max())
    print(f"without the q/k reordering: largest logit difference {off:.3f}")
    assert off > 10 * F32_LOGIT_TOL
    llm.close()


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_the_shipped_q4_1_gguf_with_the_adapter_agrees_within_quantization(
    adapter: str, exported: dict[str, Path], reference: Reference
) -> None:
    base, llm = LlamaCpp(embedded_gguf_path(), None), LlamaCpp(embedded_gguf_path(), exported[adapter])
    agree, clear = [], []
    for q in QUESTIONS:
        ids, answer, logits = reference(adapter, q)
        _, _, base_logits = reference(BASE, q)
        got = llm.logits(ids, answer)
        worst = float(np.abs(got - logits).max())
        effect = float(np.corrcoef(logits[0] - base_logits[0], got[0] - base.logits(ids)[0])[0, 1])
        print(f"{adapter}, {q!r}: largest logit difference {worst:.3f}, effect correlation {effect:.4f}")
        assert worst <= Q4_LOGIT_TOL
        assert effect >= EFFECT_MIN_CORR
        margin, moved = top_two_gap(logits, got)
        same = got.argmax(-1) == np.array(answer)
        print(
            f"  top-two gap moved by at most {moved.max():.3f}; "
            f"{int((~same).sum())} of {len(answer)} tokens differ, where PEFT's margin was {np.round(margin[~same], 3)}"
        )
        clear.extend(margin > MARGIN)
        agree.extend(same)
        assert llm.greedy(ids, NEW_TOKENS, reference.stops) != base.greedy(ids, NEW_TOKENS, reference.stops)
    assert sum(clear) >= len(clear) // 3  # enough clear choices that the next line checks something
    assert all(a for a, c in zip(agree, clear, strict=True) if c)
    base.close()
    llm.close()


def test_a_folder_exported_with_its_base_runs_where_it_is_moved(
    tmp_path: Path, reference: Reference, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--copy-base`: the folder holds the base, the adapter and a Modelfile naming both by relative paths;
    moved elsewhere, llama.cpp loads what the Modelfile names and answers as on the server."""
    from loraswap.main import main

    main(["export", ADAPTERS[0], "--out", str(tmp_path / "made"), "--copy-base"])
    moved = tmp_path / "elsewhere"
    (tmp_path / "made").rename(moved)
    lines = (moved / "Modelfile").read_text().splitlines()
    base = next(line.split(" ", 1)[1] for line in lines if line.startswith("FROM "))
    adapter = next(line.split(" ", 1)[1] for line in lines if line.startswith("ADAPTER "))
    assert base == f"./{embedded_gguf_path().name}" and adapter == f"./{ADAPTERS[0]}.gguf"
    llm = LlamaCpp(moved / base, moved / adapter)
    ids, answer, logits = reference(ADAPTERS[0], QUESTIONS[0])
    got = llm.logits(ids, answer)
    gap, _ = top_two_gap(logits, got)
    assert np.abs(got - logits).max() <= Q4_LOGIT_TOL
    assert (got.argmax(-1) == np.array(answer))[gap > MARGIN].all()
    llm.close()
