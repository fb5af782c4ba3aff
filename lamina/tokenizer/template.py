"""Chat templates: a model's own Jinja `chat_template`, rendered in a sandbox the way transformers renders it, with
tools: passed to a template that reads them, or written by lamina (Hermes-style) for one that does not."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Sequence

from lamina.errors import RequestError, TokenizerError
from lamina.tokenizer.base import Tokenizer
from lamina.tokenizer.chat import Dialog, check_dialog, tool_call_parts
from lamina.tokenizer.tools import HermesTools, Llama3JsonTools, Tool

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
        import jinja2.meta
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
        # Tools: a template that reads `tools` renders them, the calls and their results itself; one that does not
        # is given lamina's Hermes-style rendering. The calls a model writes follow its family's format.
        self.reads_tools = "tools" in jinja2.meta.find_undeclared_variables(env.parse(template))
        llama3 = "<|python_tag|>" in template or (
            self.reads_tools and "<tool_call>" not in template and "parameters" in template
        )
        self.tool_format = Llama3JsonTools() if llama3 else HermesTools()
        self.tokenizer = tokenizer
        self.special = dict(special or {})
        self.stop_tokens = [
            tokenizer.special_tokens[t] for t in END_OF_TURN_TOKENS if t in template and t in tokenizer.special_tokens
        ]

    def render(
        self, dialog: Dialog, *, add_generation_prompt: bool = True, tools: Sequence[Tool] = (), **extra: Any
    ) -> str:
        """The prompt text for `dialog` (a list of {"role", "content"} dicts; assistant messages may carry
        OpenAI's `tool_calls`, `tool` messages the results)."""
        messages = check_dialog(dialog)
        if self.reads_tools:
            messages = [_with_argument_objects(m) for m in messages]
            if tools:
                extra["tools"] = [t.as_openai() for t in tools]
        else:
            messages = self._hermes(messages, tools)
        try:
            return self._template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, **self.special, **extra
            )
        except self._error as e:
            raise RequestError(f"the chat template rejected the dialog: {e}") from None

    def encode_dialog_prompt(self, dialog: Dialog, tools: Sequence[Tool] = ()) -> list[int]:
        """Token ids of the rendered dialog; special tokens in the template are parsed as such, and no BOS is added
        beyond what the template writes (as transformers tokenizes a rendered chat)."""
        return self.tokenizer.encode(self.render(dialog, tools=tools), bos=False, eos=False, allowed_special="all")

    def _hermes(self, messages: list[dict], tools: Sequence[Tool]) -> list[dict]:
        """Tools for a template that knows none, as plain messages: the tool list appended to the system message
        (or in one of its own), calls as <tool_call> blocks in the assistant's text, results as <tool_response>
        blocks in a user message (consecutive results in one)."""
        fmt, out = HermesTools(), []
        if tools:
            prompt = fmt.system_prompt(tools)
            if messages and messages[0]["role"] == "system":
                messages = [{**messages[0], "content": f"{messages[0]['content']}\n\n{prompt}"}, *messages[1:]]
            else:
                messages = [{"role": "system", "content": prompt}, *messages]
        for m in messages:
            if m["role"] == "assistant" and m.get("tool_calls"):
                blocks = [fmt.render_call(*tool_call_parts(c)) for c in m["tool_calls"]]
                text = "\n".join(([m["content"]] if m["content"] else []) + blocks)
                out.append({"role": "assistant", "content": text})
            elif m["role"] in ("tool", "ipython"):
                result = fmt.render_result(m["content"])
                if out and out[-1]["role"] == "user" and out[-1].get("tool_results"):
                    out[-1] = {**out[-1], "content": f"{out[-1]['content']}\n{result}"}
                else:
                    out.append({"role": "user", "content": result, "tool_results": True})
            else:
                out.append({"role": m["role"], "content": m["content"]})
        return [{k: v for k, v in m.items() if k != "tool_results"} for m in out]


def _with_argument_objects(message: dict) -> dict:
    """An assistant message's tool calls with their arguments as objects, as chat templates read them (OpenAI sends
    JSON text)."""
    if not message.get("tool_calls"):
        return message
    calls = []
    for call in message["tool_calls"]:
        name, arguments = tool_call_parts(call)
        call_id = call.get("id") if isinstance(call, dict) else None
        calls.append({"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}})
    return {**message, "tool_calls": calls}
