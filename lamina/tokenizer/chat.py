"""The Llama 3 chat format: `<|start_header_id|>role<|end_header_id|>\\n\\n content <|eot_id|>` per message."""

from __future__ import annotations

from typing import Literal, Sequence, TypedDict

from lamina.errors import RequestError, TokenizerError
from lamina.tokenizer.base import Tokenizer

Role = Literal["system", "user", "assistant", "ipython"]
ROLES = ("system", "user", "assistant", "ipython")


class Message(TypedDict):
    role: Role
    content: str


Dialog = Sequence[Message]


class ChatFormat:
    """Encodes dialogs for Llama 3 instruct models. `tool` is accepted as another name for the `ipython` role."""

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
        <|eot_id|>."""
        role, content = _check_message(message)
        return [
            *self.encode_header(role),
            *self.tokenizer.encode(content.strip(), bos=False, eos=False),
            self._eot,
        ]

    def encode_dialog_prompt(self, dialog: Dialog) -> list[int]:
        """<|begin_of_text|>, every message, then an open assistant header for the model to complete."""
        tokens = [self._bos]
        for message in check_dialog(dialog):
            tokens.extend(self.encode_message(message))
        tokens.extend(self.encode_header("assistant"))
        return tokens


def check_dialog(dialog: object) -> list[dict]:
    """A dialog's shape, as every chat format needs it: a list of messages (see `check_message`); returns copies."""
    if isinstance(dialog, (str, dict)) or not isinstance(dialog, Sequence):
        raise RequestError(f"a dialog is a list of messages, got {type(dialog).__name__}")
    return [check_message(m) for m in dialog]


def check_message(message: object) -> dict:
    """A message is a dict with a str 'role' and a 'content'; returns a copy."""
    if not isinstance(message, dict) or "role" not in message or "content" not in message:
        raise RequestError(f"a message is a dict with 'role' and 'content', got {message!r:.80}")
    if not isinstance(message["role"], str):
        raise RequestError(f"message role must be a str, got {type(message['role']).__name__}")
    return dict(message)


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
