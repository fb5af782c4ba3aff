"""Chat templates: a model's own Jinja `chat_template`, rendered in a sandbox the way transformers renders it."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from lamina.errors import RequestError, TokenizerError
from lamina.tokenizer.base import Tokenizer
from lamina.tokenizer.chat import Dialog, check_dialog

# Special tokens that end an assistant turn in common templates; those a template uses become stop tokens.
END_OF_TURN_TOKENS = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>")


class ChatTemplate:
    """Encodes dialogs with a Jinja chat template (from tokenizer_config.json or GGUF metadata).

    The environment matches transformers' `apply_chat_template`: sandboxed and immutable, `trim_blocks` and
    `lstrip_blocks`, the loop-controls extension, `raise_exception`, `strftime_now`, and a `tojson` that keeps
    non-ASCII characters. The template sees `messages`, `add_generation_prompt` and the tokenizer's special tokens
    (`bos_token`, `eos_token`, ...)."""

    def __init__(self, template: str, tokenizer: Tokenizer, special: dict[str, str] | None = None):
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str):
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(template)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise TokenizerError(f"the model's chat template is not valid Jinja: {e}") from None
        self._error = jinja2.exceptions.TemplateError
        self.source = template
        self.tokenizer = tokenizer
        self.special = dict(special or {})
        self.stop_tokens = [
            tokenizer.special_tokens[t] for t in END_OF_TURN_TOKENS if t in template and t in tokenizer.special_tokens
        ]

    def render(self, dialog: Dialog, *, add_generation_prompt: bool = True, **extra: Any) -> str:
        """The prompt text for `dialog` (a list of {"role", "content"} dicts)."""
        messages = check_dialog(dialog)
        try:
            return self._template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, **self.special, **extra
            )
        except self._error as e:
            raise RequestError(f"the chat template rejected the dialog: {e}") from None

    def encode_dialog_prompt(self, dialog: Dialog) -> list[int]:
        """Token ids of the rendered dialog; special tokens in the template are parsed as such, and no BOS is added
        beyond what the template writes (as transformers tokenizes a rendered chat)."""
        return self.tokenizer.encode(self.render(dialog), bos=False, eos=False, allowed_special="all")
