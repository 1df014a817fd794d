"""Shared fixtures: a tiny Llama base built from a config, a small Q/A data set, the MedQuAD copy, moto's S3."""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from s3 import S3, moto_s3

REPO = Path(__file__).resolve().parents[1]
MEDQUAD = REPO.parent / "shared" / "data" / "medquad" / "medquad.csv.gz"
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Questions of the parity tests: prompts of different lengths in one batch.
PARITY_QUESTIONS = [
    "What are the symptoms of carditis ?",
    "What are the treatments for hepatitis ?",
    "What is osteitis ?",
    "How to prevent dermitis ?",
]

# Small templated answers: a tiny model learns them in a few steps, so training tests can check that
# loss and held-out NLL go down.
SYMPTOMS = "The signs and symptoms of {d} include fever, cough and tiredness. See a doctor if they last."
TREATMENT = "Treatment of {d} depends on the cause. Rest, fluids and medicine from a doctor help most people."
DISEASES = [f"{a}{b}itis" for a in ("card", "derm", "gastr", "hep", "nephr", "neur", "oste", "pulm") for b in "aeiou"]


@pytest.fixture(autouse=True, scope="session")
def _isolated_dirs(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Tests never touch the user's cache or adapter store; the GGUF conversion cache is shared across tests."""
    os.environ.setdefault("LORASWAP_CACHE_DIR", str(Path.home() / ".cache" / "loraswap-tests"))
    os.environ["LORASWAP_ADAPTERS_DIR"] = str(tmp_path_factory.mktemp("user-store"))
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["HF_HUB_OFFLINE"] = "1"
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def write_qa_csv(
    path: Path, rows: list[tuple[str, str, str]], header: tuple[str, ...] = ("qtype", "Question", "Answer")
) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def qa_rows() -> list[tuple[str, str, str]]:
    rows = []
    for d in DISEASES:
        rows.append(("symptoms", f"What are the symptoms of {d} ?", SYMPTOMS.format(d=d)))
        rows.append(("treatment", f"What are the treatments for {d} ?", TREATMENT.format(d=d)))
    return rows


@pytest.fixture(scope="session")
def qa_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_qa_csv(tmp_path_factory.mktemp("data") / "qa.csv", qa_rows())


def build_tiny_tokenizer(texts: list[str]):  # type: ignore[no-untyped-def]
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|pad|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|pad|>", bos_token="<|im_start|>"
    )
    fast.chat_template = CHATML
    return fast


def build_tiny_base(out: Path, initializer_range: float = 0.02) -> Path:
    """A 2-layer Llama (hidden 64) with a BPE tokenizer, saved as a local HF folder: loads in milliseconds."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from loraswap.adapters.prompt import SYSTEM_PROMPT

    texts = [SYSTEM_PROMPT] + [t for r in qa_rows() for t in r[1:]]
    tokenizer = build_tiny_tokenizer(texts)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=True,
        initializer_range=initializer_range,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def build_tiny_t5(out: Path, initializer_factor: float = 1.0) -> Path:
    """A 2-layer T5 (d_model 64) with the same BPE tokenizer, without a chat template (as T5 tokenizers come),
    so the plain prompt template applies; the decoder starts from the pad token, as T5's does."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    from loraswap.adapters.prompt import SYSTEM_PROMPT

    texts = [SYSTEM_PROMPT] + [t for r in qa_rows() for t in r[1:]]
    tokenizer = build_tiny_tokenizer(texts)
    tokenizer.chat_template = None
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=64,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=16,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
        initializer_factor=initializer_factor,
    )
    model = T5ForConditionalGeneration(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_base(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def lively_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with large random weights: its greedy output changes with the prompt and the adapter
    at every token (the default init soon repeats one token), so parity tests compare real sequences."""
    return build_tiny_base(tmp_path_factory.mktemp("lively-llama"), initializer_range=0.5)


@pytest.fixture(scope="session")
def medquad() -> Path:
    if not MEDQUAD.is_file():
        pytest.skip(f"MedQuAD copy not found beside the repository ({MEDQUAD.name})")
    return MEDQUAD


@pytest.fixture(scope="module")
def s3(request: pytest.FixtureRequest) -> Iterator[S3]:
    """moto's S3 server for one test module, with the module's `BUCKET` made in it where it names one."""
    with moto_s3(getattr(request.module, "BUCKET", None)) as server:
        yield server


def random_lora_adapter(tiny_base: Path, store_dir: Path, name: str, seed: int, qtype: str | None = None) -> Path:
    """A LoRA adapter with random non-zero weights (PEFT's `init_lora_weights=False`), installed into
    `store_dir` through the upload path. Random adapters make every generated token depend on the
    adapter, which is what parity tests need (trained tiny adapters soon repeat one token)."""
    import io
    import tarfile
    import tempfile

    import torch
    from peft import LoraConfig, get_peft_model

    from loraswap.adapters.arch import architecture
    from loraswap.adapters.archive import install_archive
    from loraswap.adapters.base import model_class, resolve_base

    ref = resolve_base(str(tiny_base))
    arch = architecture(ref.model_type)
    torch.manual_seed(seed)
    model = model_class(ref.kind).from_pretrained(tiny_base)
    task = arch.peft_task if ref.kind == "seq2seq" else None
    config = LoraConfig(r=8, lora_alpha=32, target_modules=list(arch.targets), init_lora_weights=False, task_type=task)
    peft_model = get_peft_model(model, config)
    with tempfile.TemporaryDirectory() as tmp:
        peft_model.save_pretrained(tmp)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            for f in ("adapter_config.json", "adapter_model.safetensors"):
                tar.add(Path(tmp) / f, arcname=f)
    path = install_archive(buf.getvalue(), name, store_dir, resolve_base(str(tiny_base)))
    if qtype is not None:
        from loraswap.adapters.manifest import read_manifest, write_manifest

        write_manifest(path, read_manifest(path).model_copy(update={"qtype": qtype}))
    return path


def routed_store(tiny_base: Path, out: Path) -> Path:
    """A store the servers under test serve: random LoRA adapters "symptoms" and "treatment" (seeds 1 and 2, their
    qtypes set) and a router trained on the small Q/A set, so "auto" works."""
    from loraswap.train.data import QA
    from loraswap.train.router import train_router

    random_lora_adapter(tiny_base, out, "symptoms", seed=1, qtype="symptoms")
    random_lora_adapter(tiny_base, out, "treatment", seed=2, qtype="treatment")
    train_router([QA(*r) for r in qa_rows()], min_rows=1).save(out / "router.json")
    return out


def adapter_archive(base: Path, seed: int) -> bytes:
    """A .tar.gz upload of a random (non-zero) LoRA adapter for `base`."""
    import io
    import tarfile
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = random_lora_adapter(base, Path(tmp), "x", seed)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            for f in ("adapter_config.json", "adapter_model.safetensors"):
                tar.add(path / f, arcname=f)
        return buf.getvalue()


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """`loraswap ARGS` in this process: exit code, stdout, stderr."""
    from loraswap.main import main

    try:
        main(args)
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def peft_reference(
    base_path: Path, adapter_path: Path | None, question: str, n: int, quant: str = "none", q4_kernel: str | None = None
) -> list[int]:
    """PEFT's plain path, the reference for parity: a fresh base with only this adapter, `generate`, greedy.
    `q4_kernel`: the base's 4-bit layers on that CPU kernel (`fastpath.lean_4bit`), as the engine's base under test.
    Returns the generated token ids without the end-of-turn token."""
    import torch
    from peft import PeftModel

    from loraswap.adapters.base import load_base
    from loraswap.adapters.prompt import generation_eos, prompt_ids, stop_token_ids

    base = load_base(str(base_path), quant=quant)  # type: ignore[arg-type]
    if q4_kernel is not None:
        from loraswap.server.worker import fastpath

        fastpath.lean_4bit(base.model, q4_kernel)  # type: ignore[arg-type]
    model = base.model if adapter_path is None else PeftModel.from_pretrained(base.model, str(adapter_path))
    model.eval()
    ids = torch.tensor([prompt_ids(base.tokenizer, question)])
    stops = stop_token_ids(base.tokenizer, generation_eos(base.model))
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n,
        do_sample=False,
        eos_token_id=stops,
        pad_token_id=base.tokenizer.pad_token_id,
    )
    start = 1 if base.ref.kind == "seq2seq" else ids.shape[1]  # a seq2seq output is the decoder's, from its start
    return [t for t in out[0, start:].tolist() if t not in stops]


# A function tool with a closed set of arguments: the grammar tests and the server's tool-call tests call it.
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"enum": ["Paris", "Oslo"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 3},
            },
            "required": ["city", "days"],
        },
    },
}
