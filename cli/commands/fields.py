"""Command-line options made from a dataclass's fields, so an option is written once: on the config it fills.

Each field becomes `--field-name` with the field's default, and the string under the field (its docstring,
as litgpt writes them) becomes the option's `--help`. The fields are read from the class's source with
`ast`, without importing its module: the config of `loraswap train` lives beside torch-heavy code, and
every `loraswap` command (and every server worker, which re-imports the entry point) would pay for
that import otherwise. Choices (`Literal` fields) are checked when the command runs, against the class
itself (`check_choices`).

Field types with a command-line form: bool (`--flag` when the default is False, `--flag/--no-flag` when
it is True), int, float, str and those `| None`, `tuple[str, ...]` (comma-separated) and named types
(taken as a string: a Literal alias is checked by `check_choices`). Anything else is refused, naming the field.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import inspect
import re
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from loraswap.commands.options import UsageError

F = TypeVar("F", bound=Callable[..., Any])

_SCALARS: dict[str, type] = {"int": int, "float": float, "str": str}
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")
NOT_LITERAL = object()


@dataclass(frozen=True)
class ConfigField:
    """One field of a config class as written in its source."""

    name: str
    annotation: str
    """The annotation's source text, e.g. 'int | None'."""
    default: Any
    """The default's value; NOT_LITERAL when it is not a literal (such a field has no command-line form)."""
    doc: str
    """The field's docstring as one paragraph; '' when it has none."""

    @property
    def option(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def is_tuple(self) -> bool:
        return self.annotation.replace(" ", "") in ("tuple[str,...]", "Tuple[str,...]")


def read_fields(module: str, name: str) -> list[ConfigField]:
    """The fields of the dataclass `name` in `module`, in order, read with ast from the module's source."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise LookupError(f"module {module!r} not found; the config class {name!r} is read from its source")
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"), spec.origin)
    classes = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name]
    if not classes:
        raise LookupError(f"no class {name!r} at the top level of {spec.origin}")
    body = classes[0].body
    fields = []
    for i, stmt in enumerate(body):
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        if ast.unparse(stmt.annotation).startswith(("ClassVar", "typing.ClassVar")):
            continue
        try:
            default = NOT_LITERAL if stmt.value is None else ast.literal_eval(stmt.value)
        except ValueError:  # e.g. field(default_factory=...)
            default = NOT_LITERAL
        after = body[i + 1] if i + 1 < len(body) else None
        doc = ""
        if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str):
            doc = " ".join(after.value.value.split())
        fields.append(ConfigField(stmt.target.id, ast.unparse(stmt.annotation), default, doc))
    return fields


def _cli_type(f: ConfigField, owner: str) -> Any:
    """The type typer parses the option as."""
    core, optional = f.annotation.replace(" ", ""), False
    if core.endswith("|None"):
        core, optional = core.removesuffix("|None"), True
    elif core.startswith("Optional[") and core.endswith("]"):
        core, optional = core[len("Optional[") : -1], True
    if core == "bool" and not optional:
        return bool
    if f.is_tuple:
        return str
    kind = _SCALARS.get(core)
    if kind is None and _NAME.fullmatch(core) and core not in ("bool", "list", "dict", "tuple", "set"):
        kind = str  # a named type, e.g. a Literal alias: a string here, its choices checked by `check_choices`
    if kind is None:
        raise TypeError(f"{owner}.{f.name}: no command-line form for type {f.annotation!r}; skip the field")
    return kind | None if optional else kind


def _help(f: ConfigField, names: Iterable[str], owner: str) -> str:
    text = f.doc
    if not text:
        raise ValueError(f"{owner}.{f.name} has no docstring: write one under the field, it is the option's --help")
    # `other_field` in a docstring is the option --other-field on the command line.
    text = re.sub(r"`(\w+)`", lambda m: "--" + m[1].replace("_", "-") if m[1] in names else m[0], text)
    return text + (" Comma-separated." if f.is_tuple else "")


def _parameter(f: ConfigField, names: Iterable[str], owner: str) -> inspect.Parameter:
    if f.default is NOT_LITERAL:
        raise ValueError(f"{owner}.{f.name}: an option needs a literal default (number, string, tuple); skip the field")
    kind = _cli_type(f, owner)
    help_text = _help(f, names, owner)
    if kind is bool:
        decl = f.option if f.default is False else f"{f.option}/--no-{f.option[2:]}"
        option = typer.Option(decl, help=help_text)
    else:
        option = typer.Option(f.option, help=help_text)
    default = ",".join(f.default) if f.is_tuple else f.default
    keyword = inspect.Parameter.KEYWORD_ONLY
    return inspect.Parameter(f.name, keyword, default=default, annotation=Annotated[kind, option])


def _value(f: ConfigField, given: Any) -> Any:
    if f.is_tuple:
        return tuple(t.strip() for t in given.split(",") if t.strip())
    return given


def options_from(
    module: str,
    name: str,
    *,
    skip: Iterable[str] = (),
    into: str = "config",
) -> Callable[[F], F]:
    """A typer command decorator: every field of dataclass `module.name` but `skip` becomes an option after the
    command's own parameters, and the command gets their values as one dict in its parameter `into`. Each
    field's docstring is its option's help, so the help is written in one place."""
    fields = [f for f in read_fields(module, name) if f.name not in set(skip)]
    names = {f.name for f in fields}
    generated = [_parameter(f, names, name) for f in fields]

    def wrap(fn: F) -> F:
        own = inspect.signature(fn, eval_str=True)
        if into not in own.parameters:
            raise TypeError(f"{fn.__name__} has no parameter {into!r} to receive {name}'s options")
        clash = names & set(own.parameters)
        if clash:
            raise TypeError(f"{fn.__name__}'s parameters {sorted(clash)} are also fields of {name}; skip them")
        params = [p for p in own.parameters.values() if p.name != into] + generated

        @functools.wraps(fn)
        def command(**given: Any) -> Any:
            values = {f.name: _value(f, given.pop(f.name)) for f in fields}
            return fn(**given, **{into: values})

        command.__signature__ = own.replace(parameters=params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params} | {"return": own.return_annotation}
        return command  # type: ignore[return-value]

    return wrap


def check_choices(cls: type, values: Mapping[str, Any]) -> None:
    """Every Literal-typed value of `values` (fields of `cls`) is one of its choices; a usage error names the
    option and the choices otherwise."""
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        hint = hints[key]
        if typing.get_origin(hint) is typing.Literal and value not in typing.get_args(hint):
            choices = ", ".join(str(c) for c in typing.get_args(hint))
            raise UsageError(f"--{key.replace('_', '-')} {value!r}: choose one of {choices}")
