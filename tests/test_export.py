"""`loraswap export` on the tiny bases: the GGUF adapter's layout, the Modelfile, the merged model, refusals.

The GGUF layout is checked against transformers' own GGUF reader (its reverse q/k permutation, the one
that loads the embedded base), so it does not rest on loraswap's permutation alone. Loading the files in
llama.cpp is tested in test_export_llama_cpp.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import run_cli

from loraswap.adapters.base import resolve_base
from loraswap.adapters.export import EXPORT_FILE, refuse_unexportable
from loraswap.adapters.manifest import AdapterError, AdapterManifest, sha256_of, write_manifest
from loraswap.adapters.prompt import PROMPT_FORMAT_VERSION, SYSTEM_PROMPT, prompt_ids, render_prompt
from loraswap.main import main

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QUESTIONS = ["What are the symptoms of cardatitis ?", "What are the treatments for nephritis ?"]


def make_adapter(base: str, store: Path, name: str, seed: int, b_scale: float = 0.5, **lora: Any) -> Path:
    """A LoRA adapter with random non-zero weights (B scaled by `b_scale`) for the base `base` (a --base value),
    written straight into `store` with its manifest: straight, not through the upload path, so that variants
    the server refuses, such as DoRA, exist too."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    ref = resolve_base(base)
    torch.manual_seed(seed)
    settings: dict[str, Any] = {"r": 8, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj"]} | lora
    model = AutoModelForCausalLM.from_pretrained(ref.load_path)
    model = get_peft_model(model, LoraConfig(init_lora_weights=False, **settings))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.mul_(b_scale)
    folder = store / name
    model.save_pretrained(folder)
    manifest = AdapterManifest(
        name=name,
        method="lora",
        base_id=ref.base_id,
        base_fingerprint=ref.fingerprint,
        prompt_format_version=PROMPT_FORMAT_VERSION,
        rank=settings["r"],
        alpha=settings["lora_alpha"],
        target_modules=list(settings["target_modules"]),
        weights_sha256=sha256_of(folder / "adapter_model.safetensors"),
    )
    write_manifest(folder, manifest)
    return folder


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("export-store")


def _fields(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    import gguf

    reader = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: t for t in reader.tensors}
    return fields, tensors


def test_gguf_layout_is_llama_cpps(
    lively_base: Path, store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Names from gguf's tensor map, A as is, B with llama.cpp's q/k row order (undone here by
    transformers' GGUF reader), alpha/r times B·A equal to PEFT's scale times B·A for every module,
    including rsLoRA and alpha patterns (folded into lora_b)."""
    import gguf
    from safetensors.torch import load_file
    from transformers import AutoConfig
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    make_adapter(
        str(lively_base),
        store,
        "every-linear",
        seed=1,
        target_modules=ALL_LINEAR,
        use_rslora=True,
        alpha_pattern={"down_proj": 8},
    )
    out = tmp_path / "gguf"
    code, stdout, err = run_cli(
        [
            "export",
            "every-linear",
            "--format",
            "gguf",
            "--out",
            str(out),
            "--adapters-dir",
            str(store),
            "--base",
            str(lively_base),
        ],
        capsys,
    )
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "README.md", "every-linear.gguf", EXPORT_FILE]
    fields, tensors = _fields(out / "every-linear.gguf")
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == "llama"
    alpha = fields["adapter.lora.alpha"]
    assert math.isclose(alpha, 32 * math.sqrt(8), rel_tol=1e-6)  # rsLoRA: scale = alpha' / r with alpha' = 32·√8

    config = AutoConfig.from_pretrained(lively_base)
    n_layers = config.num_hidden_layers
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    unpermute = LlamaTensorProcessor(
        config={"num_attention_heads": config.num_attention_heads, "num_key_value_heads": config.num_key_value_heads}
    )
    peft_weights = load_file(str(store / "every-linear" / "adapter_model.safetensors"))
    want_names = set()
    for layer in range(n_layers):
        for module in ALL_LINEAR:
            part = "self_attn" if module[0] in "qkvo" else "mlp"
            hf = f"model.layers.{layer}.{part}.{module}"
            base_name = names.get_name(hf)
            assert base_name is not None
            a_name, b_name = f"{base_name}.weight.lora_a", f"{base_name}.weight.lora_b"
            want_names |= {a_name, b_name}
            a_peft = peft_weights[f"base_model.model.{hf}.lora_A.weight"]
            b_peft = peft_weights[f"base_model.model.{hf}.lora_B.weight"]
            r = a_peft.shape[0]
            # GGUF lists dimensions fastest first: lora_a is [in, r], lora_b is [r, out].
            assert [int(d) for d in tensors[a_name].shape] == [a_peft.shape[1], r]
            assert [int(d) for d in tensors[b_name].shape] == [r, b_peft.shape[0]]
            a = torch.from_numpy(tensors[a_name].data.copy())
            b = tensors[b_name].data.copy()
            b = torch.from_numpy(unpermute.process(b, f"{base_name}.weight").weights.copy())
            assert torch.equal(a, a_peft)
            peft_scale = (8 if module == "down_proj" else 32) / math.sqrt(8)
            torch.testing.assert_close(alpha / r * (b @ a), peft_scale * (b_peft @ a_peft), rtol=1e-5, atol=1e-6)
    assert set(tensors) == want_names
    info = json.loads((out / EXPORT_FILE).read_text())
    assert info["format"] == "gguf" and info["gguf"]["tensor_pairs"] == n_layers * len(ALL_LINEAR)
    assert "exported every-linear as gguf" in stdout


def test_modelfile_speaks_loraswaps_prompt_format(
    tiny_base: Path, store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The Modelfile's TEMPLATE, filled in as Ollama fills it, is the prompt loraswap trains and serves on."""
    from transformers import AutoTokenizer

    make_adapter(str(tiny_base), store, "qv", seed=2)
    out = tmp_path / "ollama"
    code, _, err = run_cli(
        ["export", "qv", "--out", str(out), "--adapters-dir", str(store), "--base", str(tiny_base)], capsys
    )
    assert code == 0, err
    text = (out / "Modelfile").read_text()
    lines = text.splitlines()
    # A base given as a model folder has no GGUF yet: the Modelfile names base.gguf, the README says how to make it.
    assert "FROM ./base.gguf" in lines and "ADAPTER ./qv.gguf" in lines
    assert f'SYSTEM """{SYSTEM_PROMPT}"""' in lines
    assert 'PARAMETER stop "<|im_end|>"' in lines
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    question = QUESTIONS[0]
    filled = template.replace("{{ .System }}", SYSTEM_PROMPT).replace("{{ .Prompt }}", question)
    prompt, _, after = filled.partition("{{ .Response }}")
    assert prompt == render_prompt(tokenizer, question)
    assert after == "<|im_end|>\n"  # an earlier answer in a conversation ends as training ended it
    readme = (out / "README.md").read_text()
    assert "convert_hf_to_gguf.py" in readme and "ollama create qv -f Modelfile" in readme


@pytest.mark.parametrize(
    "variant",
    [
        {},
        {
            "target_modules": ALL_LINEAR,
            "use_rslora": True,
            "alpha_pattern": {"up_proj": 8},
        },
        {"target_modules": ["q_proj", "v_proj", "down_proj"], "use_dora": True},
    ],
    ids=["qv", "all-linear-rslora-alpha-pattern", "dora"],
)
def test_merged_model_reloads_and_matches_the_adapter_on_the_dense_base(
    lively_base: Path, store: Path, tmp_path: Path, variant: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = "merge-" + ("-".join(sorted(variant)) or "plain").replace("_", "")
    folder = make_adapter(str(lively_base), store, name, seed=3, **variant)
    out = tmp_path / "merged"
    code, _, err = run_cli(
        [
            "export",
            name,
            "--format",
            "merged",
            "--out",
            str(out),
            "--adapters-dir",
            str(store),
            "--base",
            str(lively_base),
        ],
        capsys,
    )
    assert code == 0, err
    assert (out / "model.safetensors").is_file() and (out / "README.md").is_file()
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config.get("dtype", "float32") == "float32"

    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    base = AutoModelForCausalLM.from_pretrained(lively_base).eval()
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(lively_base), str(folder)).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    for q in QUESTIONS:
        ids = torch.tensor([prompt_ids(tokenizer, q)])
        with torch.inference_mode():
            want, got, plain = peft(ids).logits, merged(ids).logits, base(ids).logits
            # The merged weight's sum rounds differently from base plus LoRA: up to 1.5e-4 apart on an AVX-512
            # Xeon (all-linear rsLoRA); the adapter itself moves logits by over 0.1.
            torch.testing.assert_close(got, want, rtol=1e-4, atol=5e-4)
            assert (want - plain).abs().max() > 0.1  # the adapter does change the base's logits
            gen = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
            assert merged.generate(ids, **gen).tolist() == peft.generate(input_ids=ids, **gen).tolist()


def test_merged_keeps_the_bases_dense_dtype(tiny_base: Path, store: Path, tmp_path: Path) -> None:
    """A bfloat16 base gives a bfloat16 merged model (merged in float32, rounded once)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    bf16_base = tmp_path / "bf16-base"
    AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.bfloat16).save_pretrained(bf16_base)
    AutoTokenizer.from_pretrained(tiny_base).save_pretrained(bf16_base)
    make_adapter(str(bf16_base), store, "bf16", seed=4)
    out = tmp_path / "merged"
    main(
        [
            "export",
            "bf16",
            "--format",
            "merged",
            "--out",
            str(out),
            "--adapters-dir",
            str(store),
            "--base",
            str(bf16_base),
        ]
    )
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16
    assert json.loads((out / EXPORT_FILE).read_text())["merged"]["dtype"] == "bfloat16"


def test_what_cannot_be_exported_is_refused_with_the_reason(
    tiny_base: Path, store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lora = {"peft_type": "LORA", "r": 8, "lora_alpha": 16}
    with pytest.raises(AdapterError, match="prefix tuning adapter cannot be exported as gguf: it is learned virtual"):
        refuse_unexportable({"peft_type": "PREFIX_TUNING"}, "gguf", "llama")
    with pytest.raises(AdapterError, match="prompt tuning adapter cannot be exported as merged"):
        refuse_unexportable({"peft_type": "PROMPT_TUNING"}, "merged", "llama")
    with pytest.raises(
        AdapterError, match="GGUF export supports bases of type llama, mistral, qwen2; this base is 'gpt2'"
    ):
        refuse_unexportable(lora, "gguf", "gpt2")
    refuse_unexportable(lora, "merged", "gpt2")  # any architecture transformers loads merges
    with pytest.raises(AdapterError, match="lora_bias: a LoRA bias term"):
        refuse_unexportable(lora | {"lora_bias": True}, "merged", "llama")

    make_adapter(str(tiny_base), store, "dora", seed=5, use_dora=True)
    code, _, err = run_cli(
        ["export", "dora", "--out", str(tmp_path / "d"), "--adapters-dir", str(store), "--base", str(tiny_base)], capsys
    )
    assert code == 2 and "use_dora: DoRA (a learned magnitude per output" in err
    assert not (tmp_path / "d").exists()

    make_adapter(str(tiny_base), store, "embeddings", seed=6, target_modules=["embed_tokens", "q_proj"])
    code, _, err = run_cli(
        ["export", "embeddings", "--out", str(tmp_path / "e"), "--adapters-dir", str(store), "--base", str(tiny_base)],
        capsys,
    )
    assert code == 2 and "model.embed_tokens" in err and "not for this module" in err
    assert not (tmp_path / "e").exists() and not list(tmp_path.glob(".tmp-*"))


def test_missing_or_damaged_adapters_and_occupied_folders_are_clear_errors(
    tiny_base: Path, store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    common = ["--adapters-dir", str(store), "--base", str(tiny_base)]
    code, _, err = run_cli(["export", "qvv", "--out", str(tmp_path / "x"), *common], capsys)
    assert code == 2 and "adapter 'qvv' not found" in err
    code, _, err = run_cli(["export", str(tmp_path / "no-such-folder"), "--out", str(tmp_path / "x"), *common], capsys)
    assert code == 2 and "no-such-folder' does not exist" in err

    make_adapter(str(tiny_base), store, "qv2", seed=7)
    code, _, err = run_cli(["export", "qv2", "--format", "onnx", "--out", str(tmp_path / "x"), *common], capsys)
    assert code == 2 and "--format 'onnx': choose gguf or merged" in err

    broken = make_adapter(str(tiny_base), store, "truncated", seed=8)
    weights = broken / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    code, _, err = run_cli(["export", "truncated", "--out", str(tmp_path / "x"), *common], capsys)
    assert code == 2 and "adapter 'truncated' cannot be exported" in err and "do not match" in err

    no_manifest = make_adapter(str(tiny_base), store, "no-manifest", seed=9)
    (no_manifest / "loraswap.json").unlink()
    code, _, err = run_cli(["export", "no-manifest", "--out", str(tmp_path / "x"), *common], capsys)
    assert code == 2 and "in the store but unusable" in err and "no loraswap.json" in err
    assert not (tmp_path / "x").exists()

    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    code, _, err = run_cli(["export", "qv2", "--out", str(occupied), *common], capsys)
    assert code == 2 and "other files in it" in err and (occupied / "notes.txt").read_text() == "mine"

    out = tmp_path / "again"
    assert run_cli(["export", "qv2", "--out", str(out), *common], capsys)[0] == 0
    code, _, err = run_cli(["export", "qv2", "--out", str(out), *common], capsys)
    assert code == 2 and "--overwrite" in err
    assert run_cli(["export", "qv2", "--out", str(out), "--overwrite", *common], capsys)[0] == 0
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "README.md", EXPORT_FILE, "qv2.gguf"]


def test_a_base_gguf_of_another_architecture_is_refused(
    tiny_base: Path, store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from loraswap.adapters.base import embedded_gguf_path

    make_adapter(str(tiny_base), store, "qv3", seed=10)
    args = ["export", "qv3", "--out", str(tmp_path / "x"), "--adapters-dir", str(store), "--base", str(tiny_base)]
    code, _, err = run_cli([*args, "--base-gguf", str(embedded_gguf_path())], capsys)
    assert code == 2 and "is not the adapter's base: llama.block_count is 30, the adapter's base has 2" in err
    code, _, err = run_cli([*args, "--copy-base"], capsys)
    assert code == 2 and "has no GGUF; give one with --base-gguf" in err


def test_qwen2_keeps_hugging_faces_row_order(tiny_base: Path, store: Path, tmp_path: Path) -> None:
    """llama.cpp's converter reorders q/k rows for the Llama family only: a Qwen2 adapter's lora_b is written as is."""
    import gguf
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    qwen = tmp_path / "tiny-qwen2"
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    Qwen2ForCausalLM(config).save_pretrained(qwen)
    tokenizer.save_pretrained(qwen)
    folder = make_adapter(str(qwen), store, "qwen", seed=12, target_modules=["q_proj", "k_proj"])
    out = tmp_path / "out"
    main(["export", "qwen", "--out", str(out), "--adapters-dir", str(store), "--base", str(qwen)])
    fields, tensors = _fields(out / "qwen.gguf")
    assert fields["general.architecture"] == "qwen2"
    peft_weights = load_file(str(folder / "adapter_model.safetensors"))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, 2)
    for layer in range(2):
        for module in ("q_proj", "k_proj"):
            hf = f"model.layers.{layer}.self_attn.{module}"
            b = peft_weights[f"base_model.model.{hf}.lora_B.weight"]
            assert torch.equal(torch.from_numpy(tensors[f"{names.get_name(hf)}.weight.lora_b"].data.copy()), b)


def test_export_explains_its_options(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(["export", "--help"], capsys)
    assert code == 0
    for option in ("--format", "--out", "--base", "--base-gguf", "--copy-base", "--overwrite", "--adapters-dir"):
        assert option in out
