"""Structured output and tools on the chat route, checked in the API process: what a constrained job's grammar is,
and the 400s for what cannot be enforced.

- `response_format`: {"type": "text"} (free), {"type": "json_object"} (any JSON object), {"type": "json_schema",
  "json_schema": {"name", "schema", "strict"}} (an instance of the schema).
- `tools` with `tool_choice` "required" or a named function: the answer is one call, generated as the JSON
  {"name": ..., "arguments": {...}} under the tools' parameter schemas and returned in OpenAI's `tool_calls`
  shape. "auto" (the default when tools are given): the model writes text, and may call functions by writing
  `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`; the text is free, and once the opening tag is
  written what follows is held to the calls' schemas up to the closing tag (xgrammar's triggered structural tags).
  The calls come back in `tool_calls`, the text around them as `content`. "none": the tools are ignored, as
  OpenAI does.

The worker enforces a schema through xgrammar (`server/worker/grammar.py`). Keywords it would not enforce are
refused here, each named with where it is (`SUPPORTED` lists what is enforced); annotations are accepted and
change nothing.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from loraswap.server.api.errors import APIError

SUPPORTED = {
    "type", "properties", "required", "additionalProperties", "items", "prefixItems", "minItems", "maxItems",
    "enum", "const", "anyOf", "$ref", "$defs", "definitions", "pattern", "format", "minLength", "maxLength",
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
}  # fmt: skip
"""JSON Schema keywords the grammar enforces (tests/test_structured.py checks each on random walks)."""
ANNOTATIONS = {"title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated", "readOnly"}
"""Keywords that constrain nothing."""
FORMATS = {"ipv6", "uuid"}
"""String formats the grammar enforces. Not "date" and "date-time", whose patterns in xgrammar admit days no month
has (February 30th), "ipv4", whose pattern admits leading zeros (1.02.3.4), "hostname", whose admits labels over
63 characters, nor the others, unchecked."""
_REGEX_UNSUPPORTED = re.compile(r"\(\?|\\[bBpPk1-9]")
"""Regex features xgrammar's converter ignores: lookaround and other (?...) groups, word boundaries, Unicode
properties, backreferences."""
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
TOOL_BEGIN, TOOL_END = "<tool_call>", "</tool_call>"
_TAGGED = re.compile(re.escape(TOOL_BEGIN) + "(.*?)" + re.escape(TOOL_END), re.DOTALL)

ANY_OBJECT: dict[str, Any] = {"type": "object"}


@dataclass(frozen=True)
class Plan:
    """What a chat request's output must be: the job's grammar, and the tools when it is a tool call."""

    grammar: str | None = None
    tools: tuple[dict[str, Any], ...] = ()
    """The functions offered ({"name", "description", "parameters"}), when the answer is or may be a call."""
    tagged: bool = False
    """tool_choice "auto": calls are written between TOOL_BEGIN and TOOL_END tags among free text."""


def unsupported(schema: Any, path: str = "#") -> list[str]:
    """Where `schema` uses what the grammar would not enforce ("#/properties/x: uniqueItems"), every place."""
    if isinstance(schema, bool):
        return [] if schema else [f"{path}: the schema false (nothing is valid)"]
    if not isinstance(schema, dict):
        return [f"{path}: a schema is an object or a boolean, not {type(schema).__name__}"]
    found = [f"{path}: {k}" for k in sorted(schema) if k not in SUPPORTED and k not in ANNOTATIONS]
    if "format" in schema and schema["format"] not in FORMATS:
        found.append(f"{path}: format {schema['format']!r} (enforced: {', '.join(sorted(FORMATS))})")
    if ("pattern" in schema or "format" in schema) and ("minLength" in schema or "maxLength" in schema):
        found.append(f"{path}: minLength/maxLength together with pattern or format")
    if isinstance(schema.get("pattern"), str) and _REGEX_UNSUPPORTED.search(schema["pattern"]):
        found.append(f"{path}: pattern {schema['pattern']!r} (lookaround, \\b, \\p or backreferences)")
    ref = schema.get("$ref")
    if ref is not None and not (isinstance(ref, str) and ref.startswith("#")):
        found.append(f"{path}: $ref {ref!r} (only references inside the schema, '#/...')")
    for key in ("properties", "$defs", "definitions"):
        if key in schema and not isinstance(schema[key], dict):
            found.append(f"{path}: {key} must be an object of schemas")
            continue
        for name, sub in schema.get(key, {}).items():
            found += unsupported(sub, f"{path}/{key}/{name}")
    for key in ("items", "additionalProperties"):
        if key in schema and schema[key] is not False:
            found += unsupported(schema[key], f"{path}/{key}")
    for key in ("prefixItems", "anyOf"):
        if key in schema and not isinstance(schema[key], list):
            found.append(f"{path}: {key} must be a list of schemas")
            continue
        for i, sub in enumerate(schema.get(key, [])):
            found += unsupported(sub, f"{path}/{key}/{i}")
    return found


def checked_schema(schema: Any, param: str) -> dict[str, Any]:
    """`schema` if the grammar can enforce all of it; else 400 naming every keyword it cannot."""
    if not isinstance(schema, dict):
        raise APIError(400, "the schema must be a JSON object", param=param, code="invalid_schema")
    found = unsupported(schema)
    if found:
        raise APIError(
            400,
            "the schema uses what structured output cannot enforce: " + "; ".join(found[:10]) + ". Enforced "
            f"keywords: {', '.join(sorted(SUPPORTED))} (annotations such as title and description are accepted)",
            param=param,
            code="unsupported_schema",
        )
    return schema


def plan(body: Any) -> Plan:
    """The output plan of a chat request (`protocol.ChatRequest`): 400 for what cannot be honoured."""
    tools = body.tools or []
    choice = body.tool_choice if body.tool_choice is not None else ("auto" if tools else "none")
    if tools and choice != "none":
        if body.response_format and body.response_format.get("type", "text") != "text":
            raise APIError(
                400, "response_format cannot be combined with a tool call; use one of them", param="response_format"
            )
        return _tool_plan(tools, choice)
    if body.tool_choice not in (None, "none") and not tools:
        raise APIError(400, "tool_choice needs tools", param="tool_choice")
    return Plan(_format_grammar(body.response_format))


def _grammar(schema: dict[str, Any], strict: bool = True) -> str:
    return json.dumps({"schema": schema, "strict": strict})


def _format_grammar(fmt: dict[str, Any] | None) -> str | None:
    kind = (fmt or {}).get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return _grammar(ANY_OBJECT, strict=False)  # any object: extra properties allowed
    if kind != "json_schema":
        raise APIError(
            400,
            f"response_format type {kind!r} is not supported; use 'text', 'json_object' or 'json_schema'",
            param="response_format.type",
        )
    spec = fmt.get("json_schema") if fmt else None
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not _NAME.fullmatch(spec["name"]):
        raise APIError(
            400,
            "response_format json_schema needs {'name': 1-64 letters, digits, '_' or '-', 'schema': {...}}",
            param="response_format.json_schema",
        )
    schema = checked_schema(spec.get("schema", {"type": "object"}), "response_format.json_schema.schema")
    return _grammar(schema)


def _tool_plan(tools: list[dict[str, Any]], choice: str | dict[str, Any]) -> Plan:
    functions: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) and tool.get("type", "function") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not _NAME.fullmatch(fn["name"]):
            raise APIError(
                400,
                "each tool is {'type': 'function', 'function': {'name': 1-64 letters, digits, '_' or '-', "
                "'description', 'parameters'}}",
                param=f"tools[{i}]",
            )
        params = checked_schema(fn.get("parameters", {"type": "object", "properties": {}}), f"tools[{i}].parameters")
        if fn["name"] in functions:
            raise APIError(400, f"two tools are named {fn['name']!r}", param=f"tools[{i}]")
        functions[fn["name"]] = {"name": fn["name"], "description": fn.get("description", ""), "parameters": params}
    if choice == "required":
        chosen = list(functions)
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if name not in functions:
            raise APIError(
                400,
                f"tool_choice names {name!r}, which is not among the tools: {', '.join(functions)}",
                param="tool_choice",
            )
        chosen = [name]
    elif choice == "auto":
        chosen = list(functions)
    else:
        raise APIError(400, "tool_choice is 'none', 'auto', 'required' or a named function", param="tool_choice")
    defs: dict[str, Any] = {}
    calls = []
    for i, n in enumerate(chosen):
        arguments = _hoist(functions[n]["parameters"], f"f{i}_", defs, f"tools[{i}].parameters")
        calls.append(
            {
                "type": "object",
                "properties": {"name": {"const": n}, "arguments": arguments},
                "required": ["name", "arguments"],
            }
        )
    schema: dict[str, Any] = calls[0] if len(calls) == 1 else {"anyOf": calls}
    if defs:
        schema = {**schema, "$defs": defs}
    offered = tuple(functions[n] for n in chosen)
    if choice != "auto":
        return Plan(_grammar(schema), offered)
    tag = {
        "type": "tag",
        "begin": TOOL_BEGIN,
        "content": {"type": "json_schema", "json_schema": schema, "max_whitespace_cnt": 1},
        "end": TOOL_END,
    }
    tags = {"type": "triggered_tags", "triggers": [TOOL_BEGIN], "tags": [tag]}
    return Plan(json.dumps({"structural_tag": {"type": "structural_tag", "format": tags}}), offered, tagged=True)


def _hoist(params: dict[str, Any], prefix: str, defs: dict[str, Any], param: str) -> dict[str, Any]:
    """`params` (a function's parameters) without its `$defs`/`definitions`, which go into `defs` under `prefix`
    with its references rewritten: inside the call's schema it is no longer the root its references point to."""
    own = {**params.get("definitions", {}), **params.get("$defs", {})}
    if not own and '"$ref"' not in json.dumps(params):
        return params

    def rewrite(node: Any) -> Any:
        if isinstance(node, list):
            return [rewrite(v) for v in node]
        if not isinstance(node, dict):
            return node
        out = {k: rewrite(v) for k, v in node.items() if k not in ("$defs", "definitions")}
        ref = node.get("$ref")
        if isinstance(ref, str):
            name = ref.removeprefix("#/$defs/").removeprefix("#/definitions/")
            if name == ref or name not in own:
                raise APIError(
                    400,
                    f"$ref {ref!r}: a tool's references must name its own $defs",
                    param=param,
                    code="unsupported_schema",
                )
            out["$ref"] = f"#/$defs/{prefix}{name}"
        return out

    for name, sub in own.items():
        defs[prefix + name] = rewrite(sub)
    hoisted: dict[str, Any] = rewrite(params)
    return hoisted


def tool_prompt(output: Plan) -> str:
    """What the model is told about the functions (the chat template knows no tools)."""
    described = [f"- {t['name']}: {t['description']} Arguments: {json.dumps(t['parameters'])}" for t in output.tools]
    if output.tagged:
        head = (
            "You may call these functions. To call one, write "
            f'{TOOL_BEGIN}{{"name": ..., "arguments": {{...}}}}{TOOL_END}; otherwise answer in text:'
        )
    else:
        head = 'Answer with a call of one of these functions, as JSON {"name": ..., "arguments": {...}}:'
    return "\n".join([head, *described])


def tool_calls(text: str, output: Plan) -> tuple[str | None, list[dict[str, Any]]]:
    """An answer's text split into its content and its calls in OpenAI's `tool_calls` shape (no calls if the
    answer has none, or a call was cut short)."""
    if not output.tagged:
        found = [text]
        content = None
    else:
        found = _TAGGED.findall(text)
        content = _TAGGED.sub("", text).strip() or None
    calls = []
    for raw in found:
        try:
            call = json.loads(raw)
        except ValueError:
            return text, []
        if not isinstance(call, dict) or "name" not in call:
            return text, []
        arguments = json.dumps(call.get("arguments", {}))
        calls.append(
            {"id": new_call_id(), "type": "function", "function": {"name": call["name"], "arguments": arguments}}
        )
    return (content, calls) if calls else (text, [])


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class CallStream:
    """A streamed answer with tools, split as it comes into text to send now and calls to send at its end. A forced
    call (tool_choice "required" or named) is all call: nothing is sent before the end. With "auto" the text is sent
    as it comes up to the first opening tag (a tail that could be the start of one is held back), and from there on
    held until the end, when the calls are known."""

    def __init__(self, output: Plan) -> None:
        self.output = output
        self.text = ""
        self.sent = 0
        self.holding = not output.tagged

    def feed(self, piece: str) -> str:
        """The text to send now, given the next piece of the answer."""
        self.text += piece
        if self.holding:
            return ""
        end = self.text.find(TOOL_BEGIN)
        if end != -1:
            self.holding = True
        else:
            end = len(self.text)
            for k in range(min(len(TOOL_BEGIN) - 1, end), 0, -1):
                if self.text.endswith(TOOL_BEGIN[:k]):
                    end -= k
                    break
        out = self.text[self.sent : end]
        self.sent = max(self.sent, end)
        return out

    def finish(self, finish: str) -> tuple[str | None, list[dict[str, Any]]]:
        """At the end (OpenAI's finish_reason): the text not sent yet, less its calls, and the calls (none unless
        the answer ended on its own with every call complete)."""
        rest = self.text[self.sent :]
        if finish != "stop":
            return rest or None, []
        content, calls = tool_calls(rest, self.output)
        if not calls:
            return rest or None, []
        return content, calls
