"""The Llama 3 chat format: `<|start_header_id|>role<|end_header_id|>\\n\\n content <|eot_id|>` per message, with
Meta's JSON tool calling (tools listed in a user message; calls written back as Meta's ChatFormat encodes them, JSON
ended by `<|eom_id|>`; the model's own calls may follow `<|python_tag|>`, which the parser accepts)."""

from __future__ import annotations

from typing import Literal, Sequence, TypedDict

from lamina.errors import RequestError, TokenizerError
from lamina.tokenizer.base import Tokenizer
from lamina.tokenizer.tools import Llama3JsonTools, Tool, arguments_object

Role = Literal["system", "user", "assistant", "ipython"]
ROLES = ("system", "user", "assistant", "ipython")


class Message(TypedDict):
    role: Role
    content: str


Dialog = Sequence[Message]


class ChatFormat:
    """Encodes dialogs for Llama 3 instruct models. `tool` is accepted as another name for the `ipython` role (a
    tool's result); an assistant message's `tool_calls` (OpenAI's shape) are written as Meta writes them."""

    tool_format = Llama3JsonTools()

    _TOKENS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")

    def __init__(self, tokenizer: Tokenizer):
        if not self.supports(tokenizer):
            raise TokenizerError(f"the Llama 3 chat format needs the tokens {', '.join(self._TOKENS)}")
        self.tokenizer = tokenizer
        sp = tokenizer.special_tokens
        self._bos, self._start, self._end, self._eot = (sp[t] for t in self._TOKENS)
        self.stop_tokens = [self._eot] + ([sp["<|eom_id|>"]] if "<|eom_id|>" in sp else [])

    @classmethod
    def supports(cls, tokenizer: Tokenizer) -> bool:
        """Whether the tokenizer's vocabulary has the special tokens this format writes."""
        return all(t in tokenizer.special_tokens for t in cls._TOKENS)

    def encode_header(self, role: str) -> list[int]:
        return [
            self._start,
            *self.tokenizer.encode(role, bos=False, eos=False),
            self._end,
            *self.tokenizer.encode("\n\n", bos=False, eos=False),
        ]

    def encode_message(self, message: Message) -> list[int]:
        """Header, the content stripped of surrounding whitespace (as Meta's format and chat template do),
        <|eot_id|>. An assistant message with tool calls: its content, then the calls as JSON ({"type": "function",
        "name", "parameters"}; ';' between), ended by <|eom_id|>, as Meta's ChatFormat writes a custom tool call."""
        role, content = _check_message(message)
        tokens = [*self.encode_header(role), *self.tokenizer.encode(content.strip(), bos=False, eos=False)]
        calls = (message.get("tool_calls") or []) if role == "assistant" else []
        if not calls:
            return [*tokens, self._eot]
        rendered = "; ".join(self.tool_format.render_call(*tool_call_parts(c)) for c in calls)
        eom = self.tokenizer.special_tokens.get("<|eom_id|>", self._eot)
        return [*tokens, *self.tokenizer.encode(rendered, bos=False, eos=False), eom]

    def encode_dialog_prompt(self, dialog: Dialog, tools: Sequence[Tool] = ()) -> list[int]:
        """<|begin_of_text|>, every message, then an open assistant header for the model to complete. With
        `tools`, Meta's JSON tool-calling prompt: "Environment: ipython" opens the system message, and a user
        message listing the tools comes before the first user message."""
        messages = check_dialog(dialog)
        if tools:
            if messages and messages[0]["role"] == "system":
                messages[0] = {**messages[0], "content": "Environment: ipython\n\n" + _text(messages[0]["content"])}
            else:
                messages.insert(0, {"role": "system", "content": "Environment: ipython\n"})
            first_user = next((i for i, m in enumerate(messages) if m["role"] == "user"), len(messages))
            messages.insert(first_user, {"role": "user", "content": self.tool_format.tools_message(tools)})
        tokens = [self._bos]
        for message in messages:
            tokens.extend(self.encode_message(message))
        tokens.extend(self.encode_header("assistant"))
        return tokens


def check_dialog(dialog: object) -> list[dict]:
    """A dialog's shape, as every chat format needs it: a list of messages (see `check_message`); returns copies."""
    if isinstance(dialog, (str, dict)) or not isinstance(dialog, Sequence):
        raise RequestError(f"a dialog is a list of messages, got {type(dialog).__name__}")
    return [check_message(m) for m in dialog]


def check_message(message: object) -> dict:
    """A message is a dict with a str 'role' and a 'content' (which an assistant message with 'tool_calls' may
    leave out or null); returns a copy, content as text (OpenAI's list of text parts joined, null as "")."""
    if not isinstance(message, dict) or "role" not in message:
        raise RequestError(f"a message is a dict with 'role' and 'content', got {message!r:.80}")
    if "content" not in message and not message.get("tool_calls"):
        raise RequestError(f"a message is a dict with 'role' and 'content', got {message!r:.80}")
    if not isinstance(message["role"], str):
        raise RequestError(f"message role must be a str, got {type(message['role']).__name__}")
    checked = dict(message)
    checked["content"] = _text(message.get("content"))
    return checked


def _text(content: object) -> str:
    """Message content as text: a str, null (""), or OpenAI's list of {"type": "text", "text": ...} parts."""
    if content is None:
        return ""
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise RequestError(
                "message content parts must be {'type': 'text', 'text': str}; this model reads text only"
            )
        return "".join(p["text"] for p in content)
    return content


def tool_call_parts(call: object) -> tuple[str, dict]:
    """(name, arguments) of an assistant message's tool call, in OpenAI's shape ({"function": {"name",
    "arguments"}}) or flat ({"name", "arguments"})."""
    function = call.get("function", call) if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise RequestError(f"a tool call is {{'function': {{'name': ..., 'arguments': ...}}}}, got {call!r:.80}")
    return function["name"], arguments_object(function.get("arguments", {}))


def _check_message(message: object) -> tuple[str, str]:
    """Llama 3's own rules on top of `check_message`: a known role and text content."""
    message = check_message(message)
    role, content = message["role"], message["content"]
    role = "ipython" if role == "tool" else role
    if role not in ROLES:
        raise RequestError(f"unknown message role {role!r}; expected one of {', '.join(ROLES)}")
    if not isinstance(content, str):
        raise RequestError(f"message content must be a str, got {type(content).__name__}")
    return role, content
