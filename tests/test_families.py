"""Bases beyond Llama: a tiny model of each causal family (Llama, Qwen2, Gemma, Phi, Phi-3) built from a config,
each trained, saved to a store and answered with two adapters and the base in one mixed batch, every row equal
to PEFT with that adapter alone. Then the quantization choices at parity, one real server on Gemma, merged
export of a non-Llama base, and the error for an architecture loraswap has no defaults for.

The families differ where loraswap must follow the base: the LoRA targets (Phi-3 fuses q, k and v into one
`qkv_proj`), the prompt (Gemma's template refuses a system turn; Phi has no template at all) and the token that
ends an answer (Gemma's `<end_of_turn>` and Qwen's `<|im_end|>` are not the tokenizer's eos).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import CHATML, peft_reference, qa_rows, random_lora_adapter, run_cli

from loraswap.adapters.arch import architecture
from loraswap.adapters.base import load_base, resolve_base
from loraswap.adapters.manifest import read_manifest
from loraswap.adapters.prompt import (
    SYSTEM_PROMPT,
    build_example,
    end_of_turn_id,
    prompt_ids,
    render_chat,
    render_prompt,
)
from loraswap.adapters.store import AdapterStore
from loraswap.server.jobs import Job
from loraswap.server.settings import LoraImpl
from loraswap.server.worker.engine import Engine
from loraswap.train.data import QA
from loraswap.train.trainer import TrainConfig, train_qtype

# Gemma's template, as its tokenizer ships it: no system turn, the assistant is "model", turns end <end_of_turn>.
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
FAMILIES = ("llama", "qwen2", "gemma", "phi", "phi3")
QUESTIONS = ["What are the symptoms of carditis ?", "What are the treatments for hepatitis ?", "What is osteitis ?"]
MIXED = [("one", QUESTIONS[0]), ("two", QUESTIONS[1]), (None, QUESTIONS[2])]
# Large learning rate, few steps: the adapters move far enough from zero to change every answer.
TRAIN = TrainConfig(max_steps=3, lr=5e-2, batch_size=4, eval_examples=2, quant="none", save_steps=100)


def _tokenizer(family: str) -> Any:
    from conftest import build_tiny_tokenizer

    texts = [SYSTEM_PROMPT] + [t for r in qa_rows() for t in r[1:]]
    tok = build_tiny_tokenizer(texts)  # ChatML, eos <|im_end|>
    if family == "gemma":
        tok.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
        tok.add_special_tokens({"bos_token": "<bos>", "eos_token": "<eos>"})
        tok.chat_template = GEMMA_TEMPLATE
    elif family == "qwen2":  # Qwen2.5's base models: eos <|endoftext|>, turns end with <|im_end|>
        tok.add_special_tokens({"eos_token": "<|endoftext|>"})
        tok.chat_template = CHATML
    elif family in ("phi", "phi3"):  # Phi-2 has no chat template: the plain template
        tok.add_special_tokens({"eos_token": "<|endoftext|>"})
        tok.chat_template = None
    return tok


def build_family_base(family: str, out: Path) -> Path:
    """A 2-layer model of `family` (hidden 64) with large random weights, so its greedy output depends on the
    prompt and the adapter at every token; saved as a local HF folder."""
    import torch
    import transformers

    tok = _tokenizer(family)
    common: dict[str, Any] = {
        "vocab_size": len(tok),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "initializer_range": 0.5,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
        "bos_token_id": tok.bos_token_id,
    }
    config_class, model_class = {
        "llama": ("LlamaConfig", "LlamaForCausalLM"),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
        "gemma": ("GemmaConfig", "GemmaForCausalLM"),
        "phi": ("PhiConfig", "PhiForCausalLM"),
        "phi3": ("Phi3Config", "Phi3ForCausalLM"),
    }[family]
    extra: dict[str, Any] = {"head_dim": 16} if family == "gemma" else {}
    if family == "phi":
        extra["partial_rotary_factor"] = 0.5
    config = getattr(transformers, config_class)(**common, **extra)
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(config)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module", params=FAMILIES)
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, Path]:
    """(family, base folder, store with two trained adapters and one random one)."""
    name = str(request.param)
    base = build_family_base(name, tmp_path_factory.mktemp(f"tiny-{name}"))
    store = tmp_path_factory.mktemp(f"store-{name}")
    rows = [QA(*r) for r in qa_rows()]
    ref = resolve_base(str(base))
    for qtype in ("symptoms", "treatment"):
        train_qtype(ref, rows, qtype, store, TRAIN, data_source="qa.csv", progress=False)
    random_lora_adapter(base, store, "random", seed=3)
    return name, base, store


def run_engine(engine: Engine, plan: list[tuple[str | None, str]], n: int) -> dict[int, str]:
    """Every request of `plan` in one batch; the text of each."""
    for i, (adapter, q) in enumerate(plan):
        engine.submit(Job(f"r{i}", prompt_ids(engine.tokenizer, q), adapter, max_tokens=n))
    text: dict[int, str] = {}
    batches = []
    while engine.has_work():
        for e in engine.step():
            text[int(e.uid[1:])] = text.get(int(e.uid[1:]), "") + e.text
            batches.append(e.batch)
    assert max(batches) == len(plan)  # they did share a batch
    return text


@pytest.mark.parametrize("impl", ["batched", "peft"])
def test_family_trains_saves_and_answers_a_mixed_batch_at_parity(
    family: tuple[str, Path, Path], impl: LoraImpl
) -> None:
    name, base_path, store_dir = family
    arch = architecture(name)
    for qtype in ("symptoms", "treatment"):
        m = read_manifest(store_dir / qtype)
        assert m.target_modules == sorted(arch.targets)  # the architecture's own targets, not Llama names
        assert m.metrics["nll"] < m.metrics["base_nll"]  # a few steps at this rate already help
    store = AdapterStore(store_dir, shipped_dir=None)
    base = load_base(str(base_path), quant="none")
    engine = Engine(base.model, base.tokenizer, store.get, lora_impl=impl)
    plan = [("symptoms", QUESTIONS[0]), ("treatment", QUESTIONS[1]), ("random", QUESTIONS[2]), (None, QUESTIONS[0])]
    got = run_engine(engine, plan, 8)
    tok = base.tokenizer
    for i, (adapter, q) in enumerate(plan):
        alone = peft_reference(base_path, None if adapter is None else store_dir / adapter, q, 8)
        assert got[i] == tok.decode(alone, skip_special_tokens=True), (name, adapter)
    base_alone = peft_reference(base_path, None, QUESTIONS[0], 8)
    assert peft_reference(base_path, store_dir / "symptoms", QUESTIONS[0], 8) != base_alone  # the adapter matters


def test_prompt_format_follows_the_template(family: tuple[str, Path, Path]) -> None:
    name, base_path, _ = family
    tok = load_base(str(base_path), quant="none").tokenizer
    text = render_prompt(tok, "What is osteitis ?")
    chat = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": "What is osteitis ?"}]
    assert render_chat(tok, chat) == text  # the chat route builds what training saw
    ex = build_example(tok, "What is osteitis ?", "Bone inflammation.", 200)
    assert ex is not None
    n = len(prompt_ids(tok, "What is osteitis ?"))
    assert ex.labels[:n] == [-100] * n and ex.labels[n:] == ex.input_ids[n:]  # loss on the answer only
    eot = tok.convert_ids_to_tokens(end_of_turn_id(tok))
    assert ex.input_ids[-1] == end_of_turn_id(tok)
    if name == "gemma":  # no system turn: its text opens the user turn
        assert (
            text
            == f"<bos><start_of_turn>user\n{SYSTEM_PROMPT}\n\nWhat is osteitis ?<end_of_turn>\n<start_of_turn>model\n"
        )
        assert eot == "<end_of_turn>" != tok.eos_token
    elif name in ("llama", "qwen2"):
        assert text.startswith(f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>")
        assert eot == "<|im_end|>"
    else:
        assert text == f"{SYSTEM_PROMPT}\n\nQuestion: What is osteitis ?\nAnswer: "
        assert eot == tok.eos_token == "<|endoftext|>"


@pytest.fixture(scope="module")
def gemma(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = build_family_base("gemma", tmp_path_factory.mktemp("gemma-q"))
    store = tmp_path_factory.mktemp("gemma-q-store")
    random_lora_adapter(base, store, "one", seed=1)
    random_lora_adapter(base, store, "two", seed=2)
    return base, store


@pytest.mark.parametrize("quant", ["nf4", "fp4"])
@pytest.mark.parametrize("impl", ["batched", "peft"])
def test_every_4bit_quantization_serves_a_mixed_batch_at_parity(
    gemma: tuple[Path, Path], quant: str, impl: LoraImpl
) -> None:
    """The same base quantized each way: each row of a mixed batch equals PEFT alone on that quantized base."""
    base_path, store_dir = gemma
    base = load_base(str(base_path), quant=quant)  # type: ignore[arg-type]
    assert type(base.model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    engine = Engine(base.model, base.tokenizer, AdapterStore(store_dir, shipped_dir=None).get, lora_impl=impl)
    got = run_engine(engine, MIXED, 8)
    tok = base.tokenizer
    for i, (adapter, q) in enumerate(MIXED):
        alone = peft_reference(base_path, None if adapter is None else store_dir / adapter, q, 8, quant=quant)
        assert got[i] == tok.decode(alone, skip_special_tokens=True), (quant, adapter)
    assert len(set(got.values())) == len(MIXED)


def test_int8_batched_lora_equals_peft_on_the_same_batch_and_alone(gemma: tuple[Path, Path]) -> None:
    """LLM.int8 computes the feature columns where any row of the batch has an outlier (|x| > 6) in 16 bit and
    the rest in 8 bit, so a row's output depends on its batch mates (on this base, PEFT's own mixed batch
    differs from PEFT alone after a few tokens). What must hold: the batched LoRA path gives PEFT's
    `adapter_names` answers for the same batch, and a request alone gives PEFT's answer alone."""
    base_path, store_dir = gemma
    store = AdapterStore(store_dir, shipped_dir=None)
    runs = {}
    for impl in ("batched", "peft"):
        base = load_base(str(base_path), quant="int8")
        assert type(base.model.model.layers[0].self_attn.q_proj).__name__ == "Linear8bitLt"
        runs[impl] = run_engine(Engine(base.model, base.tokenizer, store.get, lora_impl=impl), MIXED, 8)
    assert runs["batched"] == runs["peft"]
    assert len(set(runs["batched"].values())) == len(MIXED)
    base = load_base(str(base_path), quant="int8")  # a fresh one: PEFT's path wrapped the last one's layers
    alone = run_engine(Engine(base.model, base.tokenizer, store.get), [MIXED[0]], 8)[0]
    reference = peft_reference(base_path, store_dir / "one", MIXED[0][1], 8, quant="int8")
    assert alone == base.tokenizer.decode(reference, skip_special_tokens=True)


def test_double_quantization_is_a_choice(gemma: tuple[Path, Path]) -> None:
    base_path, _ = gemma
    for double in (True, False):
        base = load_base(str(base_path), quant="fp4", double_quant=double)
        q = base.model.model.layers[0].self_attn.q_proj.weight.quant_state
        assert (q.quant_type, q.nested) == ("fp4", double)


def test_a_gemma_server_answers_two_adapters_at_parity(gemma: tuple[Path, Path]) -> None:
    """One real server (`loraswap serve --quant nf4`) on the Gemma-style base: its quant is reported, and
    concurrent answers of two adapters equal PEFT alone on the same NF4 base, with its 4-bit layers on the kernel
    the server is told to use (loraswap's float32 one, where the CPU has AVX512-BF16: `test_q4.py`)."""
    from concurrent.futures import ThreadPoolExecutor

    from loraswap.bench.launch import launch, stop

    base_path, store_dir = gemma
    env = {"LORASWAP_Q4_KERNEL": "float32"}
    proc, url = launch(str(base_path), store_dir, quant="nf4", max_batch_size=4, env=env, timeout=120)
    try:
        models = httpx.get(f"{url}/v1/models").json()["data"]
        assert models[0]["quant"] == "nf4" and {m["id"] for m in models} >= {"one", "two"}

        def ask(adapter: str, q: str) -> str:
            body = {"model": adapter, "messages": [{"role": "user", "content": q}], "max_tokens": 8}
            r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
            assert r.status_code == 200, r.text
            return str(r.json()["choices"][0]["message"]["content"])

        jobs = [("one", QUESTIONS[0]), ("two", QUESTIONS[1]), ("one", QUESTIONS[1]), ("two", QUESTIONS[0])]
        with ThreadPoolExecutor(len(jobs)) as pool:
            answers = list(pool.map(lambda j: ask(*j), jobs))
    finally:
        stop(proc)
    tok = load_base(str(base_path), quant="none").tokenizer
    for (adapter, q), answer in zip(jobs, answers, strict=True):
        alone = peft_reference(base_path, store_dir / adapter, q, 8, quant="nf4", q4_kernel="float32")
        assert answer == tok.decode(alone, skip_special_tokens=True), adapter
    assert len(set(answers)) == len(jobs)


def test_merged_export_of_a_qwen2_base_matches_the_adapter(tmp_path: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loraswap.adapters.export import export_adapter

    base_path = build_family_base("qwen2", tmp_path / "qwen2")
    adapter = random_lora_adapter(base_path, tmp_path / "store", "one", seed=1)
    export_adapter(adapter, resolve_base(str(base_path)), "merged", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert merged.config.model_type == "qwen2"
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), str(adapter)).eval()
    ids = torch.tensor([prompt_ids(load_base(str(base_path), quant="none").tokenizer, QUESTIONS[0])])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, peft(ids).logits, atol=1e-4)


def test_gguf_export_of_a_gemma_base_is_refused_with_the_way_out(
    gemma: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base_path, store_dir = gemma
    code, _, err = run_cli(
        ["export", str(store_dir / "one"), "--base", str(base_path), "--format", "gguf", "--out", str(tmp_path / "x")],
        capsys,
    )
    assert code == 2
    assert "'gemma'" in err and "--format merged" in err


def test_unknown_architecture_names_itself_and_the_option(
    qa_csv: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """GPT-NeoX (Pythia) has no defaults here: the CLI says so, and --target-modules makes it trainable; prompt
    tuning adapts no modules, so it needs none."""
    import torch
    from conftest import build_tiny_tokenizer
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    tok = build_tiny_tokenizer([SYSTEM_PROMPT] + [t for r in qa_rows() for t in r[1:]])
    config = GPTNeoXConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4
    )
    torch.manual_seed(0)
    GPTNeoXForCausalLM(config).save_pretrained(tmp_path / "neox")
    tok.save_pretrained(tmp_path / "neox")
    args = ["train", "--base", str(tmp_path / "neox"), "--data", str(qa_csv), "--qtype", "symptoms"]
    args += ["--out", str(tmp_path / "out"), "--max-steps", "1", "--eval-examples", "0", "--quant", "none"]
    code, _, err = run_cli(args, capsys)
    assert code == 2
    assert "'gpt_neox'" in err and "--target-modules" in err
    code, _, err = run_cli([*args, "--target-modules", "query_key_value"], capsys)
    assert code == 0, err
    config_json = json.loads((tmp_path / "out" / "symptoms" / "adapter_config.json").read_text())
    assert config_json["target_modules"] == ["query_key_value"]
    prompt_args = [a if a != str(tmp_path / "out") else str(tmp_path / "prompt") for a in args]
    code, _, err = run_cli([*prompt_args, "--method", "prompt"], capsys)
    assert code == 0, err
    assert (
        json.loads((tmp_path / "prompt" / "symptoms" / "adapter_config.json").read_text())["peft_type"]
        == "PROMPT_TUNING"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--quant", "int4"], "--quant 'int4': choose one of nf4, fp4, int8, none"),
        (["--quant", "int8", "--no-double-quant"], "apply to 4-bit bases"),
        (["--quant", "fp4", "--no-quant"], "contradict"),
    ],
)
def test_bad_quant_choices_are_usage_errors(
    args: list[str], message: str, qa_csv: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["train", "--data", str(qa_csv), "--qtype", "symptoms", "--out", str(tmp_path)]
    code, _, err = run_cli([*base, *args], capsys)
    assert code == 2 and message in err, err


def test_server_refuses_a_bad_quant_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LORASWAP_QUANT", "q4")
    code, _, err = run_cli(["serve"], capsys)
    assert code == 2 and "LORASWAP_QUANT" in err and "'nf4'" in err, err
