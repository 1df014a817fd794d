"""The `loraswap` command's options: train's come from TrainConfig's field docstrings, every option explains itself."""

from __future__ import annotations

import dataclasses
import importlib
import re
import textwrap
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from loraswap.commands.fields import options_from, read_fields
from loraswap.commands.options import DEFAULT_DATA, UsageError
from loraswap.commands.train import CONFIG
from loraswap.main import app

TOY = '''
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Color = Literal["red", "green"]


@dataclass
class Toy:
    """Not an option's help."""

    steps: int = 3
    """How many steps; -1 runs for `epochs` instead."""
    epochs: float = 1.0
    """Passes over the data."""
    color: Color = "red"
    """The colour."""
    limit: int | None = None
    """At most this many."""
    modules: tuple[str, ...] = ("a", "b")
    """Modules to adapt."""
    fast: bool = False
    """Go fast."""
    tidy: bool = True
    """Tidy up after."""
'''


def _toy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str = TOY) -> str:
    name = f"toy_{tmp_path.name}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    return name


def _command(module: str, **kw: Any) -> tuple[typer.Typer, dict[str, Any]]:
    got: dict[str, Any] = {}

    @options_from(module, "Toy", **kw)
    def run(config: dict[str, Any], name: str = "x") -> None:
        got.update(config, name=name)

    app = typer.Typer()
    app.command()(run)
    app.command("other")(lambda: None)  # two commands: the toy is invoked by name
    return app, got


def _options(command: Any) -> list[Any]:
    """The command's options (typer vendors click: its classes are not the `click` package's)."""
    return [p for p in command.params if getattr(p, "param_type_name", "") == "option"]


def _help_of(command: Any) -> dict[str, str]:
    return {p.opts[0]: p.help or "" for p in _options(command)}


def test_fields_become_options_with_their_docstrings_as_help(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = _toy(tmp_path, monkeypatch)
    app, got = _command(module)
    helps = _help_of(typer.main.get_command(app).commands["run"])  # type: ignore[attr-defined]
    assert helps["--steps"] == "How many steps; -1 runs for --epochs instead."  # a field's name is its option
    assert helps["--modules"] == "Modules to adapt. Comma-separated."
    assert helps["--color"] == "The colour." and helps["--tidy"] == "Tidy up after."
    runner = CliRunner()
    r = runner.invoke(app, ["run"])
    assert r.exit_code == 0, r.output
    assert got == {"steps": 3, "epochs": 1.0, "color": "red", "limit": None, "modules": ("a", "b"), "fast": False,
                   "tidy": True, "name": "x"}  # fmt: skip
    args = ["run", "--steps", "-1", "--limit", "4", "--modules", "q, v,", "--fast", "--no-tidy", "--name", "y"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert got["steps"] == -1 and got["limit"] == 4 and got["modules"] == ("q", "v") and got["name"] == "y"
    assert got["fast"] is True and got["tidy"] is False


def test_choices_are_checked_against_the_class(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from loraswap.commands.fields import check_choices

    toy = importlib.import_module(_toy(tmp_path, monkeypatch)).Toy
    check_choices(toy, {"color": "green", "steps": 5})
    with pytest.raises(UsageError, match=r"--color 'blue': choose one of red, green"):
        check_choices(toy, {"color": "blue"})


def test_a_field_without_a_docstring_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = _toy(tmp_path, monkeypatch, TOY + "    quiet: bool = False\n")
    with pytest.raises(ValueError, match=r"Toy\.quiet has no docstring"):
        _command(module)
    _command(module, skip=("quiet",))


def test_fields_without_a_command_line_form_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    listed = _toy(tmp_path, monkeypatch, TOY + '    sizes: list[int] = []\n    """Sizes."""\n')
    with pytest.raises(TypeError, match=r"Toy.sizes: no command-line form for type 'list\[int\]'"):
        _command(listed)
    _command(listed, skip=("sizes",))


def test_train_options_are_trainconfig_fields() -> None:
    from loraswap.train.trainer import TrainConfig

    read = read_fields(*CONFIG)
    real = dataclasses.fields(TrainConfig)
    assert [f.name for f in read] == [f.name for f in real]
    assert [f.default for f in read] == [f.default for f in real]
    helps = _help_of(typer.main.get_command(app).commands["train"])  # type: ignore[attr-defined]
    for f in read:
        if f.name in ("quant", "double_quant"):  # the shared --quant/--double-quant/--no-quant options
            continue
        assert f.option in helps, f.name
        assert f.doc, f.name
        written = re.sub(r"`(\w+)`", lambda m: "--" + m[1].replace("_", "-"), f.doc)
        assert helps[f.option].startswith(written), f.name


def test_every_option_of_every_command_has_help() -> None:
    def walk(command: Any, path: str) -> None:
        for p in _options(command):
            if p.opts != ["--help"]:
                assert p.help, f"{path} {p.opts[0]}"
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, f"{path} {name}")

    walk(typer.main.get_command(app), "loraswap")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--bogus"], "No such option: --bogus"),
        (["train", "--max-steps", "many"], "Invalid value for '--max-steps'"),
        (["train", "--qtype", "symptoms", "--method", "ia3"], "--method 'ia3': choose one of lora, prefix"),
    ],
)
def test_usage_errors_exit_2_without_a_traceback(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from conftest import run_cli

    code, _, err = run_cli(args, capsys)
    assert code == 2 and message in err and "Traceback" not in err


def test_the_default_data_is_the_training_datas() -> None:
    from loraswap.train.data import DEFAULT_DATA as TRAIN_DEFAULT

    assert DEFAULT_DATA == TRAIN_DEFAULT
