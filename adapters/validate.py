"""Checks an adapter folder before it may touch a model.

Everything here reads files and config only (the base's layer shapes come from a meta-device
model, no weights), so it is cheap enough to run on every upload and every start-up.
"""

from __future__ import annotations

import json
import math
import struct
from functools import lru_cache
from pathlib import Path
from typing import Any

from loraswap.adapters.base import BaseRef
from loraswap.adapters.lora import (
    DEFAULT_ALPHA,
    describe_targets,
    lora_rank,
    parse_tensor_name,
    short_names,
    targeted_modules,
    tensor_modules,
)
from loraswap.adapters.manifest import (
    CONFIG_FILE,
    MANIFEST_FILE,
    WEIGHTS_FILE,
    AdapterError,
    AdapterManifest,
    BaseMismatch,
    method_of,
    read_manifest,
    read_peft_config,
    sha256_of,
)
from loraswap.adapters.prompt import PROMPT_FORMAT_VERSION

DEFAULT_MAX_RANK = 64
MAX_ALPHA = 1 << 16
"""lora_alpha above this scales a LoRA update out of any useful range (PEFT's defaults are 8 to 2 * r)."""
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}


def check_compatible(manifest: AdapterManifest, ref: BaseRef) -> None:
    """Refuse an adapter trained on another base, naming both."""
    if manifest.base_fingerprint != ref.fingerprint:
        raise BaseMismatch(
            f"adapter {manifest.name!r} was trained on base {manifest.base_id!r} (fingerprint "
            f"{manifest.base_fingerprint}) but the loaded base is {ref.base_id!r} (fingerprint {ref.fingerprint})"
        )
    if manifest.prompt_format_version != PROMPT_FORMAT_VERSION:
        raise AdapterError(
            f"adapter {manifest.name!r} uses prompt format v{manifest.prompt_format_version}; "
            f"this loraswap speaks v{PROMPT_FORMAT_VERSION}"
        )


@lru_cache(maxsize=8)
def base_modules(load_path: str) -> dict[str, tuple[int, int] | None]:
    """{module path: (in_features, out_features) for a linear layer, None for any other module} of the base, from
    its config (a meta-device model: no weights are read)."""
    import torch
    from transformers import AutoConfig

    from loraswap.adapters.arch import kind_of
    from loraswap.adapters.base import model_class

    config = AutoConfig.from_pretrained(load_path)
    with torch.device("meta"):
        model = model_class(kind_of(config.model_type)).from_config(config)
    return {
        name: (m.in_features, m.out_features) if isinstance(m, torch.nn.Linear) else None
        for name, m in model.named_modules()
        if name
    }


def linear_shapes(load_path: str) -> dict[str, tuple[int, int]]:
    """{module path: (in_features, out_features)} of every linear layer of the base, from its config."""
    return {name: shape for name, shape in base_modules(load_path).items() if shape is not None}


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The header of a safetensors file, checked to describe a well-formed file of this size: every
    tensor a float dtype, a shape of non-negative ints, offsets that match the shape, and together the
    tensors cover the data exactly (no overlap, no gap), as safetensors requires."""
    size = path.stat().st_size
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise AdapterError(f"{path.name} is too short to be safetensors")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, 100 << 20):
            raise AdapterError(f"{path.name}: header length {n} does not fit in a {size}-byte file")
        try:
            header = json.loads(f.read(n))
        except (ValueError, RecursionError):
            raise AdapterError(f"{path.name}: header is not JSON; not a safetensors file") from None
    if not isinstance(header, dict):
        raise AdapterError(f"{path.name}: header is not a JSON object; not a safetensors file")
    data_len = size - 8 - n
    spans: list[tuple[int, int, str]] = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise AdapterError(f"{path.name}: tensor {name} has no dtype, shape and offsets")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in _FLOAT_DTYPES:
            raise AdapterError(f"{path.name}: tensor {name} has dtype {dtype}; expected a float type")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
            raise AdapterError(f"{path.name}: tensor {name} has shape {shape!r}; expected a list of sizes")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets):
            raise AdapterError(f"{path.name}: tensor {name} has offsets {offsets!r}; expected [start, end]")
        start, end = offsets
        itemsize = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}[dtype]
        if any(d < 0 for d in shape) or not 0 <= start <= end <= data_len or end - start != itemsize * math.prod(shape):
            raise AdapterError(f"{path.name}: tensor {name} offsets {start}..{end} do not match its shape or the file")
        spans.append((start, end, name))
    covered = 0
    for start, end, name in sorted(spans):
        if start != covered:
            what = "overlaps another tensor" if start < covered else "leaves a gap before it"
            raise AdapterError(f"{path.name}: tensor {name} at offset {start} {what}; the header lies about offsets")
        covered = end
    if covered != data_len:
        raise AdapterError(f"{path.name}: the tensors cover {covered} of {data_len} data bytes; the header lies")
    return header


def validate_adapter(
    folder: Path,
    ref: BaseRef | None = None,
    max_rank: int = DEFAULT_MAX_RANK,
    require_manifest: bool = True,
    allow_dora: bool = False,
    weights_sha256: str | None = None,
) -> list[str]:
    """Everything wrong with `folder` as an adapter for `ref` (empty list: it is fine). `allow_dora` is for
    uses that do not serve the adapter (a merged export); `weights_sha256` is the weights' digest where the
    caller has computed it already (an upload), so the file is hashed once."""
    problems: list[str] = []
    if not folder.is_dir():
        return [f"{folder.name!r} is not a folder"]
    for f in folder.rglob("*"):
        if f.is_symlink():
            problems.append(f"{f.name} is a symbolic link; adapters must be plain files")
        elif f.suffix in PICKLE_SUFFIXES:
            problems.append(f"{f.name}: pickled weights are refused (they can run code); use safetensors")
    if problems:
        return problems
    if not (folder / WEIGHTS_FILE).is_file():
        problems.append(f"no {WEIGHTS_FILE}")
    try:
        config = read_peft_config(folder)
        method = method_of(config)
    except AdapterError as e:
        return [*problems, str(e)]
    if method == "lora":
        if config.get("use_dora") and not allow_dora:
            problems.append("DoRA adapters are not supported (they cannot share a mixed batch)")
        problems.extend(_check_ranks(config, max_rank))
        alpha = config.get("lora_alpha", DEFAULT_ALPHA)
        if not isinstance(alpha, int | float) or isinstance(alpha, bool) or not 0 < alpha <= MAX_ALPHA:
            problems.append(f"lora_alpha={alpha!r} is not a number in (0, {MAX_ALPHA}]")
    manifest: AdapterManifest | None = None
    if (folder / MANIFEST_FILE).is_file() or require_manifest:
        try:
            manifest = read_manifest(folder)
        except AdapterError as e:
            problems.append(str(e))
    if manifest and manifest.method != method:
        problems.append(f"{MANIFEST_FILE} says method {manifest.method!r} but {CONFIG_FILE} says {method!r}")
    if method != "lora" and ref is not None and ref.kind == "seq2seq":
        problems.append(
            f"a {method} adapter on a seq2seq base ({ref.model_type}): loraswap serves LoRA only on encoder-decoder "
            "bases (virtual tokens and prefixes are placed for decoder-only bases)"
        )
    if manifest and ref is not None:
        try:
            check_compatible(manifest, ref)
        except AdapterError as e:
            problems.append(str(e))
            ref = None  # shapes of another base say nothing more
    if (folder / WEIGHTS_FILE).is_file():
        problems.extend(_check_weights(folder / WEIGHTS_FILE, config, method, ref, manifest, weights_sha256))
    return problems


def _check_ranks(config: dict[str, Any], max_rank: int) -> list[str]:
    """`r`, and every rank of `rank_pattern`, an int in 1..max_rank."""
    problems = []
    rank = config.get("r")
    if not _rank_ok(rank, max_rank):
        problems.append(f"LoRA rank r={rank!r} is outside 1..{max_rank}")
    pattern = config.get("rank_pattern") or {}
    if not isinstance(pattern, dict):
        return [*problems, f"rank_pattern={pattern!r} is not a mapping of module names to ranks"]
    for key, value in pattern.items():
        if not _rank_ok(value, max_rank):
            problems.append(f"LoRA rank rank_pattern[{key!r}]={value!r} is outside 1..{max_rank}")
    return problems


def _rank_ok(rank: Any, max_rank: int) -> bool:
    return isinstance(rank, int) and not isinstance(rank, bool) and 1 <= rank <= max_rank


def _check_weights(
    path: Path,
    config: dict[str, Any],
    method: str,
    ref: BaseRef | None,
    manifest: AdapterManifest | None,
    weights_sha256: str | None,
) -> list[str]:
    from safetensors.torch import load

    try:
        header = read_safetensors_header(path)
    except AdapterError as e:
        return [str(e)]
    problems: list[str] = []
    if manifest and manifest.weights_sha256 != (weights_sha256 or sha256_of(path)):
        problems.append(f"{WEIGHTS_FILE} does not match the sha256 recorded in {MANIFEST_FILE}")
    try:
        # Read as bytes: safetensors' file-based loaders leak a little per call (see slots.load_tensors).
        tensors = load(path.read_bytes())
    except Exception as e:  # safetensors' own error type; the header checks above should leave nothing for it
        return [*problems, f"{WEIGHTS_FILE} cannot be read as safetensors: {e}"]
    for name, t in tensors.items():
        if not t.isfinite().all():
            problems.append(f"tensor {name} contains NaN or Inf")
    if method != "lora":
        return problems
    names = [n for n in header if n != "__metadata__"]
    parsed = {n: parse_tensor_name(n) for n in names}
    if not any(lt is not None and not lt.embedding for lt in parsed.values()):
        problems.append(f"{WEIGHTS_FILE} holds no LoRA A/B tensors")
    modules = base_modules(ref.load_path) if ref is not None else None
    problems.extend(_check_targets(config, tensor_modules(names), ref, modules))
    if ref is None or modules is None:
        return problems
    for name, lt in parsed.items():
        if lt is None or lt.embedding:
            continue
        shape = modules.get(lt.module)
        if shape is None:
            problems.append(f"tensor {name} targets {lt.module!r}, which base {ref.base_id!r} does not have")
            continue
        fan_in, fan_out = shape
        rank = lora_rank(config, lt.module)
        want = [rank, fan_in] if lt.part == "A" else [fan_out, rank]
        if list(header[name]["shape"]) != want:
            problems.append(f"tensor {name} has shape {header[name]['shape']}; base {ref.base_id!r} needs {want}")
    return problems


def _check_targets(
    config: dict[str, Any],
    weights: set[str],
    ref: BaseRef | None,
    modules: dict[str, tuple[int, int] | None] | None,
) -> list[str]:
    """The config's `target_modules`, the base's modules and the modules the tensors adapt must agree: the modules
    the config targets on the base (PEFT's matching) are exactly those with weights, and every name the config
    lists is a module of the base. PEFT refuses to load an adapter whose targets the base lacks, and the store
    lists an adapter by its config's targets, so a mismatch is refused naming both lists. Without a base the
    config is checked against the tensors alone."""
    targets = config.get("target_modules")
    if not weights or targets is None:
        return []  # no LoRA tensors is reported on its own; no targets: PEFT picks the architecture's defaults
    if isinstance(targets, str) and targets.lower() == "all-linear":
        return []  # every linear layer but the head: tensors on other modules fail the shape check
    candidates = set(modules) if modules is not None else weights
    try:
        targeted = targeted_modules(config, candidates)
    except AdapterError as e:
        return [str(e)]
    unmatched: list[str] = []
    if isinstance(targets, list | tuple):
        unmatched = sorted(str(t) for t in targets if not any(m == t or m.endswith(f".{t}") for m in candidates))
    untargeted = {w for w in weights if w not in targeted and (modules is None or w in modules)}
    without = targeted - weights
    if not (unmatched or untargeted or without):
        return []
    why = []
    if unmatched:
        where = f"base {ref.base_id!r} has no module" if ref is not None else "no weights are for a module"
        why.append(f"{where} named {', '.join(map(repr, unmatched))}")
    if untargeted:
        why.append(f"weights for modules the config does not target: {_some(untargeted)}")
    if without:
        why.append(f"no weights for targeted modules: {_some(without)}")
    return [
        f"{CONFIG_FILE} targets {describe_targets(config)} but {WEIGHTS_FILE} holds LoRA weights for "
        f"{short_names(weights)} ({'; '.join(why)}); target_modules must name the modules the weights adapt"
    ]


def _some(modules: set[str], n: int = 3) -> str:
    shown = sorted(modules)[:n]
    more = len(modules) - len(shown)
    return ", ".join(shown) + (f" and {more} more" if more else "")
