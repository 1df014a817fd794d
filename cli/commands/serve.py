"""`loraswap serve`: the base and every adapter of the store over HTTP; options override LORASWAP_* settings."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from loraswap.commands.options import (
    AdaptersDirOpt,
    DoubleQuantOpt,
    LoraImplOpt,
    NoQuantOpt,
    QuantOpt,
    RegistryOpt,
    UsageError,
    pick_quant,
    quiet_libraries,
)


def settings_from(**given: Any) -> Any:
    """Server settings from LORASWAP_* and the options given; a bad value is a usage error naming it."""
    from pydantic import ValidationError

    from loraswap.server.settings import Settings

    try:
        return Settings.from_env(**given)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        raise UsageError(
            f"setting {field} (LORASWAP_{field.upper()} or --{field.replace('_', '-')}): {err['msg']}"
        ) from None


def serve(
    host: Annotated[str | None, typer.Option("--host", help="Address to listen on [default 127.0.0.1].")] = None,
    port: Annotated[int | None, typer.Option("--port", help="Port [default 8000].")] = None,
    adapters_dir: AdaptersDirOpt = None,
    base: Annotated[str | None, typer.Option("--base", help="Base model, as for train [default embedded].")] = None,
    workers: Annotated[int | None, typer.Option("--workers", help="Worker processes, each with the base.")] = None,
    max_batch_size: Annotated[
        int | None, typer.Option("--max-batch-size", help="Requests decoded together per worker [default 16].")
    ] = None,
    quant: QuantOpt = None,
    double_quant: DoubleQuantOpt = None,
    no_quant: NoQuantOpt = False,
    lora_impl: LoraImplOpt = None,
    lm_head: Annotated[
        str | None,
        typer.Option(
            "--lm-head",
            help="Output projection on CPU: 'auto' (bf16 where the CPU has native bf16 and it measures faster, "
            "top logits recomputed in float32) [default], 'float32' or 'bfloat16'.",
        ),
    ] = None,
    q4_kernel: Annotated[
        str | None,
        typer.Option(
            "--q4-kernel",
            help="4-bit layers on CPUs with AVX512-BF16: 'auto' (the fastest at the batch size, timed at start-up) "
            "[default], 'bitsandbytes', or loraswap's 'float32', 'bfloat16' or 'int8' (int8 inputs, VNNI).",
        ),
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option(
            "--threads",
            help="Compute threads of a CPU worker, fixed. Default: the CPUs the worker may use (affinity mask, "
            "cgroup CPU quota), one fewer while other processes keep them busy.",
        ),
    ] = None,
    registry: RegistryOpt = None,
    cors_origins: Annotated[
        str | None,
        typer.Option(
            "--cors-origins",
            help="Comma-separated web origins whose browser pages may call the API ('*': any) [default none].",
        ),
    ] = None,
    ray: Annotated[
        bool,
        typer.Option(
            "--ray",
            help="Run as replicas on Ray Serve, each a whole server, requests for an adapter routed to a replica "
            "holding it (needs the extra: pip install 'loraswap[ray]').",
        ),
    ] = False,
    replicas: Annotated[
        int | None, typer.Option("--replicas", help="With --ray: replicas (the initial count with autoscaling) [1].")
    ] = None,
    ray_address: Annotated[
        str | None,
        typer.Option("--ray-address", help="With --ray: an existing Ray cluster [default: start a local one]."),
    ] = None,
    min_replicas: Annotated[
        int | None, typer.Option("--min-replicas", help="With --ray: autoscale, no fewer replicas than this.")
    ] = None,
    max_replicas: Annotated[
        int | None, typer.Option("--max-replicas", help="With --ray: autoscale, no more replicas than this.")
    ] = None,
    target_ongoing_requests: Annotated[
        float | None,
        typer.Option(
            "--target-ongoing-requests", help="With --ray and autoscaling: requests per replica aimed at [2]."
        ),
    ] = None,
    replica_cpus: Annotated[
        float | None, typer.Option("--replica-cpus", help="With --ray: CPUs Ray reserves per replica [1].")
    ] = None,
) -> None:
    """Serve the base and every adapter of the store over HTTP (OpenAI-compatible); LORASWAP_* set defaults."""
    from loraswap.server.api.app import serve as run_server

    ray_only = {
        "--replicas": replicas,
        "--ray-address": ray_address,
        "--min-replicas": min_replicas,
        "--max-replicas": max_replicas,
        "--target-ongoing-requests": target_ongoing_requests,
        "--replica-cpus": replica_cpus,
    }
    given = [flag for flag, value in ray_only.items() if value is not None]
    if given and not ray:
        raise UsageError(f"{', '.join(given)} apply to --ray only")
    quiet_libraries()
    settings = settings_from(
        host=host,
        port=port,
        adapters_dir=adapters_dir,
        base=base,
        workers=workers,
        max_batch_size=max_batch_size,
        quant=pick_quant(quant, no_quant, double_quant) if quant or no_quant else None,
        double_quant=double_quant,
        lora_impl=lora_impl,
        lm_head=lm_head,
        q4_kernel=q4_kernel,
        threads=threads,
        registry=registry,
        cors_origins=cors_origins,
    )
    if ray:
        code = _serve_on_ray(
            settings,
            replicas=replicas or 1,
            address=ray_address,
            min_replicas=min_replicas,
            max_replicas=max_replicas,
            target_ongoing_requests=target_ongoing_requests,
            replica_cpus=replica_cpus or 1.0,
        )
    else:
        code = run_server(settings)
    if code:
        raise typer.Exit(code)


def _serve_on_ray(settings: Any, **options: Any) -> int:
    """`serve --ray`: the application on Ray Serve (`server/cluster/app.py`); bad options and a missing Ray are
    usage errors that say what to do."""
    from loraswap.server.cluster.app import INSTALL, ClusterError, RayOptions, run

    try:
        import ray.serve  # noqa: F401
    except ImportError:
        raise UsageError(f"--ray needs Ray Serve, an optional extra: {INSTALL}") from None
    try:
        return run(settings, RayOptions(**options))
    except ClusterError as e:
        raise UsageError(str(e)) from None
