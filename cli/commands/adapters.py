"""`loraswap adapters list|validate|install|remove|push|pull` and `loraswap export`: the adapter store, and an
adapter registry (`--registry s3://BUCKET/PREFIX`), from the shell."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, cast

import typer

from loraswap.commands.options import (
    AdaptersDirOpt,
    BaseOpt,
    RegistryOpt,
    UsageError,
    open_registry,
    quiet_libraries,
)

app = typer.Typer(help="Inspect and check the adapter store.", no_args_is_help=True)


@app.command("list")
def adapters_list(
    adapters_dir: AdaptersDirOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="A JSON list of adapter descriptions.")] = False,
    registry: RegistryOpt = None,
) -> None:
    """List the store (shipped adapters and the user directory), or with --registry the registry's adapters."""
    from loraswap.adapters.store import AdapterStore

    store = AdapterStore.default(adapters_dir)
    if registry:
        from loraswap.adapters.replica import RegistryEntry

        reg = open_registry(registry)
        described = [RegistryEntry(n, reg.record(n)).describe() for n in sorted(reg.list())]
    else:
        described = [e.describe() for e in store.entries().values()]
    if as_json:
        print(json.dumps(described, indent=2))
        return
    print(f"{'name':22s} {'qtype':18s} {'method':7s} {'rank':>4s} {'size':>9s}  source  base")
    for d in described:
        size = f"{int(d['size_bytes']) / 1e6:.2f} MB"  # type: ignore[call-overload]
        print(
            f"{d['name']!s:22s} {d['qtype'] or '-'!s:18s} {d['method']!s:7s} {d['rank'] or '-'!s:>4s} "
            f"{size:>9s}  {d['source']!s:7s} {d['base_id']} ({d['base_fingerprint']})"
        )
    for name, why in ({} if registry else store.problems()).items():
        print(f"unusable: {name}: {why}", file=sys.stderr)


@app.command("validate")
def adapters_validate(
    path: Annotated[Path, typer.Argument(help="An adapter folder.")],
    base: BaseOpt = "embedded",
    max_rank: Annotated[int, typer.Option("--max-rank", help="Largest LoRA rank accepted.")] = 64,
) -> None:
    """Check one adapter folder against the base; prints what is wrong, exit status 1 if anything is."""
    from loraswap.adapters.base import resolve_base
    from loraswap.adapters.validate import validate_adapter

    quiet_libraries()
    problems = validate_adapter(path, resolve_base(base), max_rank=max_rank)
    if problems:
        for p in problems:
            print(f"{path.name}: {p}")
        raise typer.Exit(1)
    print(f"{path.name}: ok")


@app.command("install")
def adapters_install(
    archive: Annotated[
        Path,
        typer.Argument(
            help="A .tar.gz or .zip with adapter_config.json and adapter_model.safetensors (optionally loraswap.json)."
        ),
    ],
    name: Annotated[str, typer.Option("--name", help="Name in the store: [a-z0-9][a-z0-9._-]{0,63}.")],
    adapters_dir: AdaptersDirOpt = None,
    base: BaseOpt = "embedded",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an adapter of the same name.")] = False,
    max_rank: Annotated[int, typer.Option("--max-rank", help="Largest LoRA rank accepted.")] = 64,
) -> None:
    """Validate an adapter archive against the base and add it to the user store (all or nothing)."""
    from loraswap.adapters.archive import install_archive
    from loraswap.adapters.base import resolve_base
    from loraswap.adapters.store import AdapterStore

    quiet_libraries()
    store = AdapterStore.default(adapters_dir)
    try:
        path = install_archive(archive.read_bytes(), name, store.user_dir, resolve_base(base), overwrite, max_rank)
    except FileExistsError as e:
        raise UsageError(f"{e}; pass --overwrite to replace it") from None
    print(f"installed {name} -> {path}")


@app.command("remove")
def adapters_remove(
    name: Annotated[str, typer.Argument(help="Adapter to delete from the user store (or the registry).")],
    adapters_dir: AdaptersDirOpt = None,
    registry: RegistryOpt = None,
) -> None:
    """Delete a user adapter (shipped adapters are read-only); with --registry, unpublish it from the registry
    (every server stops serving it within its listing interval)."""
    from loraswap.adapters.store import AdapterStore

    if registry:
        open_registry(registry).remove(name)
        print(f"removed {name} from {registry}")
        return
    AdapterStore.default(adapters_dir).remove(name)
    print(f"removed {name}")


@app.command("push")
def adapters_push(
    adapter: Annotated[str, typer.Argument(help="A store adapter's name, or an adapter folder (a path).")],
    registry: RegistryOpt = None,
    name: Annotated[str | None, typer.Option("--name", help="Name in the registry [default: the adapter's].")] = None,
    adapters_dir: AdaptersDirOpt = None,
    base: BaseOpt = "embedded",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an adapter of the same name.")] = False,
    max_rank: Annotated[int, typer.Option("--max-rank", help="Largest LoRA rank accepted.")] = 64,
) -> None:
    """Validate an adapter against the base, then publish it to the registry (all or nothing)."""
    from loraswap.adapters.base import resolve_base
    from loraswap.adapters.export import find_adapter
    from loraswap.adapters.registry import publish
    from loraswap.adapters.store import AdapterStore

    quiet_libraries()
    reg = open_registry(registry)
    folder = find_adapter(adapter, AdapterStore.default(adapters_dir))
    target = name or Path(adapter).name
    record = publish(reg, folder, target, resolve_base(base), max_rank, overwrite=overwrite)
    print(f"pushed {target} to {reg.uri} ({record.size_bytes} bytes, weights {record.adapter.weights_sha256[:12]})")


@app.command("pull")
def adapters_pull(
    name: Annotated[str, typer.Argument(help="Adapter in the registry.")],
    registry: RegistryOpt = None,
    adapters_dir: AdaptersDirOpt = None,
    base: BaseOpt = "embedded",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a user adapter of the same name.")] = False,
    max_rank: Annotated[int, typer.Option("--max-rank", help="Largest LoRA rank accepted.")] = 64,
) -> None:
    """Copy an adapter from the registry into the user store: every file checked against its sha256, then the
    full validation against the base, then one atomic rename."""
    import shutil

    from loraswap.adapters.base import resolve_base
    from loraswap.adapters.registry import fetch
    from loraswap.adapters.store import AdapterStore

    quiet_libraries()
    reg = open_registry(registry)
    store = AdapterStore.default(adapters_dir)
    staged = store.stage(name)
    try:
        fetch(reg, reg.record(name), staged, resolve_base(base), max_rank)
        entry = store.add(staged, name, overwrite=overwrite)
    except FileExistsError as e:
        raise UsageError(f"{e}; pass --overwrite to replace it") from None
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    print(f"pulled {name} -> {entry.path}")


def export(
    name: Annotated[
        str, typer.Argument(help="Adapter to export: a name in the store, or a path to an adapter folder.")
    ],
    fmt: Annotated[
        str,
        typer.Option(
            "--format",
            help="gguf: llama.cpp LoRA adapter + Ollama Modelfile + README; merged: a dense model with the adapter "
            "merged in (safetensors, the base's dense dtype).",
        ),
    ] = "gguf",
    out: Annotated[
        Path, typer.Option("--out", help="Folder to write (new, empty, or an earlier export with --overwrite).")
    ] = Path("export"),
    adapters_dir: AdaptersDirOpt = None,
    base: BaseOpt = "embedded",
    base_gguf: Annotated[
        Path | None,
        typer.Option(
            "--base-gguf",
            help="GGUF of the base for the Modelfile's FROM (default: the embedded base's, or --base when it is a "
            ".gguf; other bases: convert them with llama.cpp's convert_hf_to_gguf.py).",
        ),
    ] = None,
    copy_base: Annotated[
        bool, typer.Option("--copy-base", help="Copy the base GGUF into --out, so the folder runs on another machine.")
    ] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an earlier export in --out.")] = False,
) -> None:
    """Export an adapter: a GGUF LoRA adapter for llama.cpp and Ollama, or a merged dense model."""
    from loraswap.adapters.base import resolve_base
    from loraswap.adapters.export import FORMATS, Format, export_adapter, find_adapter
    from loraswap.adapters.store import AdapterStore

    quiet_libraries()
    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt!r}: choose {' or '.join(FORMATS)}")
    source = find_adapter(name, AdapterStore.default(adapters_dir))
    result = export_adapter(
        source,
        resolve_base(base),
        cast("Format", fmt),
        out,
        base_gguf=base_gguf,
        copy_base=copy_base,
        overwrite=overwrite,
    )
    print(f"exported {result.info['adapter']['name']} as {fmt} to {out}: {', '.join(result.files)}")
