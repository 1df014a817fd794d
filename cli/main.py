"""The `loraswap` command: the app, its subcommands (one module per group in `loraswap.commands`), and the one
place where an error becomes an exit status."""

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
    from loraswap.adapters.arch import UnknownArchitectureError
    from loraswap.adapters.base import BaseModelError
    from loraswap.adapters.manifest import AdapterError
    from loraswap.commands.options import UsageError
    from loraswap.train.data import DataError

    try:
        code = app(argv, standalone_mode=False)  # without standalone mode click returns exit codes
        if isinstance(code, int) and code:
            sys.exit(code)
    except (UsageError, DataError, AdapterError, BaseModelError, UnknownArchitectureError) as e:
        print(f"loraswap: error: {e}", file=sys.stderr)
        sys.exit(2)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except Exception as e:  # click's own usage errors
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, click.exceptions.Abort):
            sys.exit(130)
        raise


if __name__ == "__main__":
    main()
