"""Tool calling in chat formats: the tool definitions a request brings, how each model family is told of them and
writes its calls, and how those calls are read back out of its text.

Two families of formats, as the models were trained:
- `HermesTools`: calls as `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks (Hermes, Qwen 2.5,
  SmolLM2, and any chat template that writes `<tool_call>`); also what lamina tells a model whose chat template has
  no notion of tools, in a system message of its own.
- `Llama3JsonTools`: Llama 3.1 / 3.2 / 3.3 JSON calls, `{"name": ..., "parameters": {...}}`, after `<|python_tag|>`
  in Meta's own format (several separated by `;`).

Each gives the text of its calls for the next turn (`render_call`), reads calls out of a reply (`parse`: text that
is not a complete, well-formed call of a defined tool stays content), says while streaming how much of the text so
far is content whatever follows (`content_prefix`), and writes the Lark grammar (llguidance's, with `%json` schemas) that
constrains a reply to calls, for tool_choice "required" or a named function.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any, Sequence

from lamina.errors import RequestError

# JSON as a grammar writes it: the separators the models were trained on, no free whitespace.
_JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class Tool:
    """A function the model may call: its name, description and JSON Schema of parameters (OpenAI's `tools`).
    `strict` (OpenAI's `function.strict`): a constrained call's arguments hold no keys the schema does not name."""

    name: str
    description: str | None
    parameters: dict
    strict: bool = False

    def as_openai(self) -> dict:
        function: dict[str, Any] = {"name": self.name}
        if self.description is not None:
            function["description"] = self.description
        function["parameters"] = self.parameters
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ToolCall:
    """A call read out of a reply: OpenAI's `tool_calls` entry (`arguments` is JSON text)."""

    id: str
    name: str
    arguments: str

    def as_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def check_tools(tools: object) -> list[Tool]:
    """OpenAI's `tools` list, checked: each {"type": "function", "function": {"name", "description"?,
    "parameters"?}}, names unique. RequestError naming what is wrong."""
    if not isinstance(tools, list):
        raise RequestError(f"tools must be a list, got {type(tools).__name__}")
    checked: list[Tool] = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise RequestError(f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}")
        function = tool.get("function")
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise RequestError(f"tools[{i}].function needs a name")
        name = function["name"]
        if not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", name):
            raise RequestError(f"tools[{i}].function.name {name!r} must be 1-64 letters, digits, '_', '.' or '-'")
        parameters = function.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(parameters, dict):
            raise RequestError(f"tools[{i}].function.parameters must be a JSON Schema object")
        description = function.get("description")
        if description is not None and not isinstance(description, str):
            raise RequestError(f"tools[{i}].function.description must be a string")
        strict = function.get("strict") or False
        if not isinstance(strict, bool):
            raise RequestError(f"tools[{i}].function.strict must be true or false")
        checked.append(Tool(name, description, parameters, strict))
    names = [t.name for t in checked]
    if len(set(names)) != len(names):
        raise RequestError(f"tool names must be unique, got {names}")
    return checked


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def arguments_object(arguments: object) -> dict:
    """A call's arguments as a dict, from OpenAI's JSON text (or a dict already)."""
    if isinstance(arguments, dict):
        return arguments
    if isinstance(arguments, str):
        try:
            value = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            raise RequestError(f"a tool call's arguments are not valid JSON: {arguments!r:.80}") from None
        if isinstance(value, dict):
            return value
    raise RequestError(f"a tool call's arguments must be a JSON object, got {arguments!r:.80}")


def _call_schema(tool: Tool, arguments_key: str) -> dict:
    """The JSON Schema of one call of `tool` as a format writes it: {"name": <const>, <arguments_key>: params}."""
    return {
        "type": "object",
        "properties": {
            "name": {"const": tool.name},
            arguments_key: _closed(tool.parameters) if tool.strict else tool.parameters,
        },
        "required": ["name", arguments_key],
        "additionalProperties": False,
        "x-guidance": _JSON_STYLE,
    }


def _closed(schema: object) -> object:
    """A copy of a JSON Schema whose objects allow no properties beyond those they name (where they say nothing
    else), through its subschemas."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in ("properties", "$defs", "definitions", "patternProperties"):
        if isinstance(schema.get(key), dict):
            out[key] = {name: _closed(sub) for name, sub in schema[key].items()}
    for key in ("items", "additionalProperties", "not", "if", "then", "else", "contains"):
        if isinstance(schema.get(key), dict):
            out[key] = _closed(schema[key])
    for key in ("anyOf", "oneOf", "allOf", "prefixItems"):
        if isinstance(schema.get(key), list):
            out[key] = [_closed(sub) for sub in schema[key]]
    if (schema.get("type") == "object" or "properties" in schema) and "additionalProperties" not in schema:
        out["additionalProperties"] = False
    return out


def _call_rules(tools: Sequence[Tool], arguments_key: str) -> list[str]:
    """Lark rules (llguidance's) for `call`: a call of any one of `tools`, each its own %json schema."""
    rules = [f"call: {' | '.join(f'call_{i}' for i in range(len(tools)))}"]
    return rules + [f"call_{i}: %json {json.dumps(_call_schema(t, arguments_key))}" for i, t in enumerate(tools)]


def _objects(text: str) -> list[object] | None:
    """The JSON values of `text`, one after another (separated by whitespace or ';'), or None if it is not that."""
    decoder, values, i = json.JSONDecoder(), [], 0
    text = text.strip()
    while i < len(text):
        try:
            value, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            return None
        values.append(value)
        while i < len(text) and text[i] in " \t\r\n;":
            i += 1
    return values


def _as_call(value: object, tools: Sequence[Tool]) -> ToolCall | None:
    """A call if `value` is {"name": a defined tool, "arguments" or "parameters": an object}, else None."""
    if not isinstance(value, dict) or set(value) - {"name", "arguments", "parameters", "type"}:
        return None
    name = value.get("name")
    arguments = value.get("arguments", value.get("parameters", {}))
    if not any(t.name == name for t in tools) or not isinstance(arguments, dict):
        return None
    return ToolCall(new_call_id(), name, json.dumps(arguments, ensure_ascii=False))


class HermesTools:
    """`<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` blocks, one per call."""

    name = "hermes"
    OPEN, CLOSE = "<tool_call>", "</tool_call>"

    def system_prompt(self, tools: Sequence[Tool]) -> str:
        """What a model whose template has no tool support is told (Hermes' and Qwen's wording of it)."""
        listed = "\n".join(json.dumps(t.as_openai(), ensure_ascii=False) for t in tools)
        return (
            "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            f"You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{listed}\n"
            "</tools>\n\nFor each function call, return a json object with function name and arguments within "
            f"{self.OPEN}{self.CLOSE} XML tags:\n{self.OPEN}\n"
            '{"name": <function-name>, "arguments": <args-json-object>}\n'
            f"{self.CLOSE}"
        )

    def render_call(self, name: str, arguments: dict) -> str:
        call = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
        return f"{self.OPEN}\n{call}\n{self.CLOSE}"

    def render_result(self, content: str) -> str:
        return f"<tool_response>\n{content}\n</tool_response>"

    def parse(self, text: str, tools: Sequence[Tool]) -> tuple[str | None, list[ToolCall]]:
        """(content, calls): the blocks as calls, the text around them as content (None when only whitespace). A
        block that is not a well-formed call of a defined tool leaves the whole text as content."""
        if self.OPEN not in text:
            return text, []
        calls, content, at = [], [], 0
        while (start := text.find(self.OPEN, at)) >= 0:
            content.append(text[at:start])
            end = text.find(self.CLOSE, start)
            body = text[start + len(self.OPEN) : len(text) if end < 0 else end]
            values = _objects(body)
            call = _as_call(values[0], tools) if values and len(values) == 1 else None
            if call is None:
                return text, []
            calls.append(call)
            at = len(text) if end < 0 else end + len(self.CLOSE)
        content.append(text[at:])
        joined = "".join(content)
        return (joined if joined.strip() else None), calls

    def content_prefix(self, text: str) -> int:
        """How much of a reply's start is content whatever follows (streaming lets that out): the text before a
        call block, less a tail that could still become one, and nothing while it is only whitespace."""
        start = text.find(self.OPEN)
        end = len(text) if start < 0 else start
        if start < 0:
            for n in range(min(len(self.OPEN) - 1, len(text)), 0, -1):
                if text.endswith(self.OPEN[:n]):
                    end = len(text) - n
                    break
        return end if text[:end].strip() else 0

    def grammar(self, tools: Sequence[Tool], *, several: bool) -> str:
        """A reply of calls only: one block (`several` False) or one or more, each a call of one of `tools`."""
        start = 'start: block ("\\n" block)*' if several else "start: block"
        block = f'block: "{self.OPEN}\\n" call "\\n{self.CLOSE}"'
        return "\n".join([start, block, *_call_rules(tools, "arguments")])


class Llama3JsonTools:
    """Llama 3.1+ JSON calls: `<|python_tag|>{"name": ..., "parameters": {...}}`, as Meta's format writes them
    (the tag is optional on reading; several calls separated by ';')."""

    name = "llama3_json"
    TAG = "<|python_tag|>"

    def tools_message(self, tools: Sequence[Tool]) -> str:
        """The user message that lists the tools (Meta's JSON tool-calling prompt)."""
        listed = "\n".join(json.dumps(t.as_openai(), indent=4, ensure_ascii=False) for t in tools)
        return (
            "Answer the user's question by making use of the following functions if needed.\n"
            "If none of the function can be used, please say so.\n"
            f"Here is a list of functions in JSON format:\n{listed}\n\n"
            "Return function calls in JSON format."
        )

    def render_call(self, name: str, arguments: dict) -> str:
        return json.dumps({"type": "function", "name": name, "parameters": arguments}, ensure_ascii=False)

    def parse(self, text: str, tools: Sequence[Tool]) -> tuple[str | None, list[ToolCall]]:
        """(content, calls): the reply is calls only if, past the tag, it is nothing but JSON objects that each call
        a defined tool; otherwise it is all content (prose that happens to be JSON stays content)."""
        body = text.strip().removeprefix(self.TAG)
        if not body.lstrip().startswith("{"):
            return text, []
        calls = [_as_call(v, tools) for v in _objects(body) or ()]
        if not calls or any(c is None for c in calls):
            return text, []
        return None, calls

    def content_prefix(self, text: str) -> int:
        """A reply that starts (past whitespace) with '{' or the tag may be calls, to the end: hold it all."""
        stripped = text.lstrip()
        if not stripped or stripped.startswith(("{", self.TAG)) or self.TAG.startswith(stripped):
            return 0
        return len(text)

    def grammar(self, tools: Sequence[Tool], *, several: bool) -> str:
        """Calls only: one, or with `several` one or more separated by '; '."""
        start = 'start: call ("; " call)*' if several else "start: call"
        return "\n".join([start, *_call_rules(tools, "parameters")])


ToolFormat = HermesTools | Llama3JsonTools


class CallStream:
    """A streamed reply read for tool calls: `add(piece)` returns the text that is content whatever follows (a
    possible call is held back), `finish()` the rest of the content and the calls, once the reply is whole. What
    `add` and `finish` return together equals `fmt.parse` of the whole text."""

    def __init__(self, fmt: ToolFormat, tools: Sequence[Tool]):
        self.fmt, self.tools = fmt, list(tools)
        self.text, self.emitted = "", 0

    def add(self, piece: str) -> str:
        self.text += piece
        safe = self.fmt.content_prefix(self.text)
        if safe <= self.emitted:
            return ""
        out, self.emitted = self.text[self.emitted : safe], safe
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        content, calls = self.fmt.parse(self.text, self.tools)
        rest = (content or "")[self.emitted :]
        return rest, calls
