"""The request bodies the server accepts, checked (pydantic): OpenAI's /v1/completions and /v1/chat/completions,
with their sampling settings as lamina's SamplingParams, and vLLM's /tokenize and /detokenize. Unknown fields are
ignored, as OpenAI's own server does; lamina's extensions (top_k, min_p, repetition_penalty, ignore_eos,
stop_token_ids, vLLM's structured_outputs) sit beside the standard ones, as in vLLM. Also the context rule: how many
tokens a request may get."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from lamina.engine.sampling import MAX_TOP_LOGPROBS, SamplingParams, StructuredOutputs
from lamina.errors import RequestError


class StreamOptions(BaseModel):
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    """OpenAI's `response_format.json_schema`."""

    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | bool = Field(default=True, alias="schema")
    strict: bool | None = None

    model_config = ConfigDict(populate_by_name=True)


class ResponseFormat(BaseModel):
    """OpenAI's `response_format`: plain text, any JSON object, or JSON that validates against a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type json_schema needs a json_schema")
        return self


class StructuredOutputsBody(BaseModel):
    """vLLM's `structured_outputs` field: one of json (a schema), json_object, regex, choice, grammar."""

    json_: dict[str, Any] | bool | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    model_config = ConfigDict(populate_by_name=True)


class _Sampling(BaseModel):
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stop: str | list[str] | None = None
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    seed: int | None = None
    # lamina's (and vLLM's) extensions
    top_k: int = Field(default=0, ge=-1)
    min_p: float = Field(default=0.0, ge=0, le=1)
    repetition_penalty: float = Field(default=1.0, gt=0)
    ignore_eos: bool = False
    stop_token_ids: list[int] = Field(default_factory=list)
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsBody | None = None
    # vLLM's earlier names for structured_outputs' fields
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    @property
    def include_usage(self) -> bool:
        return self.stream and self.stream_options is not None and self.stream_options.include_usage

    def constraint(self) -> StructuredOutputs | None:
        """The request's structured-output constraint, from response_format, structured_outputs or vLLM's guided_*
        fields (at most one of them)."""
        found = []
        if self.response_format is not None and self.response_format.type != "text":
            if self.response_format.type == "json_object":
                found.append(("response_format", StructuredOutputs(json_object=True)))
            else:
                found.append(("response_format", StructuredOutputs(json=self.response_format.json_schema.schema_)))
        if self.structured_outputs is not None:
            body = self.structured_outputs
            found.append(
                (
                    "structured_outputs",
                    StructuredOutputs(
                        json=body.json_,
                        regex=body.regex,
                        choice=body.choice,
                        grammar=body.grammar,
                        json_object=bool(body.json_object),
                    ),
                )
            )
        guided = {
            "json": self.guided_json,
            "regex": self.guided_regex,
            "choice": self.guided_choice,
            "grammar": self.guided_grammar,
        }
        guided = {k: v for k, v in guided.items() if v is not None}
        if guided:
            found.append(("guided_" + next(iter(guided)), StructuredOutputs(**guided)))
        if len(found) > 1:
            raise ValueError(f"give one structured-output constraint, got {' and '.join(name for name, _ in found)}")
        return found[0][1] if found else None

    def choices(self, *, max_tokens: int | None, logprobs: bool, top_logprobs: int, **extra) -> list[SamplingParams]:
        """SamplingParams for each of the n choices: choice j of a seeded request draws with seed + j, so the choices
        differ and each is reproducible."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        bias = {}
        for key, value in (self.logit_bias or {}).items():
            try:
                bias[int(key)] = value
            except ValueError:
                raise ValueError(f"logit_bias keys must be token ids, got {key!r}") from None
        base = SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            logit_bias=bias,
            seed=self.seed,
            max_tokens=max_tokens,
            stop=tuple(stop),
            stop_token_ids=tuple(self.stop_token_ids),
            logprobs=logprobs,
            top_logprobs=top_logprobs,
            ignore_eos=self.ignore_eos,
            structured_outputs=extra.pop("structured_outputs", None) or self.constraint(),
            **extra,
        )
        if self.seed is None:
            return [base] * self.n
        return [dataclasses.replace(base, seed=self.seed + j) for j in range(self.n)]


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=0)  # OpenAI's default for completions; 0 only with echo
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False

    @model_validator(mode="after")
    def _zero_tokens_only_to_echo(self):
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens must be at least 1 (0 only with echo, to score the prompt)")
        return self


class Message(BaseModel):
    """A chat message: text content (or OpenAI's text parts); an assistant's may be null when it carries
    `tool_calls`; a `tool` message answers the call `tool_call_id`. "developer" is OpenAI's newer "system"."""

    role: Literal["system", "developer", "user", "assistant", "tool", "ipython"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _content_given(self):
        if self.role == "developer":
            self.role = "system"
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs content (only an assistant's with tool_calls may omit it)")
        return self

    def as_dict(self) -> dict:
        return self.model_dump(exclude_none=True)


class FunctionName(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"] = "function"
    function: FunctionName


class ChatCompletionRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    @model_validator(mode="after")
    def _tool_choice_needs_tools(self):
        if self.tool_choice not in (None, "none") and not self.tools:
            raise ValueError("tool_choice needs tools")
        return self

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize: a text `prompt` (with the tokenizer's BOS when add_special_tokens), or chat `messages`
    through the model's chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = None
    add_special_tokens: bool = True

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give either prompt or messages")
        return self


class DetokenizeRequest(BaseModel):
    model: str | None = None
    tokens: list[int]


def token_budget(prompt_tokens: int, max_tokens: int | None, context: int) -> int:
    """New tokens a request may get: `max_tokens`, or with None what the context leaves. A prompt plus max_tokens
    beyond the context is refused, naming both numbers, as OpenAI does."""
    if max_tokens is None:
        if prompt_tokens >= context:
            raise RequestError(
                f"This model's maximum context length is {context} tokens. However, your prompt has {prompt_tokens} "
                "tokens, which leaves no room for a completion. Please reduce the length of the prompt."
            )
        return context - prompt_tokens
    if prompt_tokens + max_tokens > context:
        raise RequestError(
            f"This model's maximum context length is {context} tokens. However, you requested "
            f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} in the completion). "
            "Please reduce the length of the prompt or completion."
        )
    return max_tokens
