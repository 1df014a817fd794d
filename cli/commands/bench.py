"""`loraswap bench`: the load test and benchmarks (bench/runner.py), or with --soak the soak (bench/soak.py)."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from loraswap.commands.options import (
    BaseOpt,
    DoubleQuantOpt,
    LoraImplOpt,
    NoQuantOpt,
    QuantOpt,
    UsageError,
    pick_quant,
    quiet_libraries,
)


def bench(
    url: Annotated[
        str | None, typer.Option("--url", help="Measure this running server instead of starting one.")
    ] = None,
    quick: Annotated[
        bool, typer.Option("--quick", help="Every scenario, small (under 3 minutes on 2 CPU cores).")
    ] = False,
    base: BaseOpt = "embedded",
    quant: QuantOpt = None,
    double_quant: DoubleQuantOpt = None,
    no_quant: NoQuantOpt = False,
    max_batch_size: Annotated[int, typer.Option("--max-batch-size", help="Batch of the server started here.")] = 16,
    lora_impl: LoraImplOpt = None,
    clients: Annotated[int | None, typer.Option("--clients", help="Closed-loop concurrent clients.")] = None,
    max_tokens: Annotated[int | None, typer.Option("--max-tokens", help="Tokens generated per request.")] = None,
    rounds: Annotated[int | None, typer.Option("--rounds", help="Interleaved rounds of every scenario.")] = None,
    adapters: Annotated[
        int | None, typer.Option("--adapters", help="Synthetic adapters for the mixed scenarios [64; 8 with --soak].")
    ] = None,
    no_reference: Annotated[
        bool, typer.Option("--no-reference", help="Skip the llama.cpp reference even where it is installed.")
    ] = False,
    no_llama_server: Annotated[
        bool, typer.Option("--no-llama-server", help="Skip the llama-server scenarios even where it is built.")
    ] = False,
    peer_only: Annotated[
        bool,
        typer.Option(
            "--peer-only",
            help="Only the scenarios llama-server runs too (base, single, mixed16, mixed64, short beside long) and "
            "its, interleaved; no baselines, cold loads, uploads, open loop or churn.",
        ),
    ] = False,
    llama_server: Annotated[
        str | None,
        typer.Option(
            "--llama-server",
            envvar="LORASWAP_LLAMA_SERVER",
            help="The llama-server binary [default: the one `make llama-server` built].",
        ),
    ] = None,
    out: Annotated[Path, typer.Option("--out", help="Folder for report.md, results.json and the PNG charts.")] = Path(
        "bench-results"
    ),
    api_key: Annotated[str | None, typer.Option("--api-key", envvar="LORASWAP_API_KEY", help="Inference key.")] = None,
    admin_key: Annotated[
        str | None, typer.Option("--admin-key", envvar="LORASWAP_ADMIN_KEY", help="Admin key (uploads).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as one JSON object.")] = False,
    soak: Annotated[
        bool,
        typer.Option(
            "--soak",
            help="Instead of the benchmarks: mixed traffic plus uploads and deletes for --soak-seconds; fails (exit "
            "1) on any unexpected error, resident memory off by more than 5% after warm-up, or leaked fds/threads.",
        ),
    ] = False,
    soak_seconds: Annotated[float, typer.Option("--soak-seconds", help="Length of the soak, warm-up included.")] = 180,
) -> None:
    """Load-test the server: throughput and latency with 1 to 64 adapters, baselines, cold loads, memory."""
    quiet_libraries()
    if soak:
        from loraswap.bench.report import write_soak
        from loraswap.bench.soak import SoakConfig, run_soak

        soak_cfg = SoakConfig(
            url=url, base=base, quant=pick_quant(quant, no_quant, double_quant),
            double_quant=double_quant is not False, max_batch_size=max_batch_size,
            seconds=soak_seconds, clients=clients or 8, max_tokens=max_tokens or 16, adapters=adapters or 8,
            api_key=api_key, admin_key=admin_key,
        )  # fmt: skip
        if soak_cfg.seconds < 10 or soak_cfg.adapters < 1:
            raise UsageError("--soak-seconds must be at least 10 and --adapters at least 1")
        with contextlib.redirect_stdout(sys.stderr):
            outcome = run_soak(soak_cfg)
            command = f"loraswap bench --soak --soak-seconds {soak_seconds:g}" + (
                f" --base {base}" if base != "embedded" else ""
            )
            report = write_soak(outcome, out, command)
        print(json.dumps(outcome) if as_json else report.read_text())
        if not outcome["passed"]:
            raise typer.Exit(1)
        return

    from loraswap.bench.config import BenchConfig
    from loraswap.bench.report import write
    from loraswap.bench.results import summary
    from loraswap.bench.runner import run_bench

    adapters = adapters or 64
    given = {"clients": clients, "max_tokens": max_tokens, "rounds": rounds}
    kw: dict[str, Any] = {k: v for k, v in given.items() if v is not None} | {
        "url": url,
        "base": base,
        "quant": pick_quant(quant, no_quant, double_quant),
        "double_quant": double_quant is not False,
        "max_batch_size": max_batch_size,
        "lora_impl": lora_impl,
        "adapters": adapters,
        "reference": not no_reference,
        "peer": not no_llama_server,
        "peer_only": peer_only,
        "llama_server": llama_server,
        "api_key": api_key,
        "admin_key": admin_key,
    }
    if "clients" not in kw:
        kw["clients"] = max_batch_size
    if adapters < 1:
        raise UsageError("--adapters must be at least 1")
    if peer_only and no_llama_server:
        raise UsageError("--peer-only runs the llama-server scenarios; --no-llama-server skips them: choose one")
    cfg = BenchConfig.quick(**kw) if quick else BenchConfig(**kw)
    with contextlib.redirect_stdout(sys.stderr):
        collected = run_bench(cfg)
        result = summary(collected)
        flags: dict[str, Any] = {"--quick": quick, "--quant": kw["quant"] if kw["quant"] != "nf4" else None}
        flags |= {"--no-double-quant": double_quant is False, "--url": url, "--lora-impl": lora_impl}
        flags |= {"--clients": clients, "--max-tokens": max_tokens, "--rounds": rounds}
        flags |= {"--peer-only": peer_only, "--no-llama-server": no_llama_server}
        flags |= {"--base": base if base != "embedded" else None, "--adapters": adapters if adapters != 64 else None}
        flags["--max-batch-size"] = max_batch_size if max_batch_size != 16 else None
        command = " ".join(["loraswap bench"] + [k if v is True else f"{k} {v}" for k, v in flags.items() if v])
        report = write(collected, result, out, command)
    print(json.dumps(result) if as_json else report.read_text())
