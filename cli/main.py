"""The `loraswap` command: the app, its subcommands (one module per group in `loraswap.commands`), and the one
place where an error becomes an exit status.

Exit statuses: 0 done; 1 a check failed (`adapters validate`, `bench --soak`); 2 a usage error or an error the
user can fix (bad option, data, adapter, base or registry), printed as one line; 130 interrupted.
"""

from __future__ import annotations

import sys

import typer

from loraswap.commands import adapters, bench, evaluate, serve, train

app = typer.Typer(
    help="One 4-bit base LLM, many LoRA adapters: train per-qtype adapters, evaluate them, manage the store.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.command("train")(train.train)
app.command("eval")(evaluate.eval_)
app.command("export")(adapters.export)
app.command("serve")(serve.serve)
app.command("train-router")(train.train_router)
app.command("train-bench")(train.train_bench)
app.command("bench")(bench.bench)
app.add_typer(adapters.app, name="adapters")


def main(argv: list[str] | None = None) -> None:
    """Run the command line; returns on success, exits with the status above otherwise."""
    from loraswap.adapters.arch import UnknownArchitectureError
    from loraswap.adapters.base import BaseModelError
    from loraswap.adapters.manifest import AdapterError
    from loraswap.adapters.registry import RegistryError
    from loraswap.commands.options import UsageError
    from loraswap.train.data import DataError

    try:
        # Standalone: typer shows its own usage errors (an unknown option, a value of the wrong type) with the
        # usage line and exits 2, exits with a command's typer.Exit status, 130 on Ctrl-C, 0 when done.
        app(argv)
    except (UsageError, DataError, AdapterError, BaseModelError, UnknownArchitectureError, RegistryError) as e:
        print(f"loraswap: error: {e}", file=sys.stderr)
        sys.exit(2)
    except SystemExit as e:
        if e.code:
            raise


if __name__ == "__main__":
    main()
