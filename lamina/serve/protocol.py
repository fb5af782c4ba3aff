"""OpenAI's request bodies for /v1/completions and /v1/chat/completions, checked (pydantic), and their sampling
settings as lamina's SamplingParams. Unknown fields are ignored, as OpenAI's own server does; lamina's extensions
(top_k, min_p, repetition_penalty, ignore_eos) sit beside the standard ones, as in vLLM."""

from __future__ import annotations

import dataclasses
from typing import Literal

from pydantic import BaseModel, Field

from lamina.engine.sampling import MAX_TOP_LOGPROBS, SamplingParams


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

    def choices(self, *, max_tokens: int | None, logprobs: bool, top_logprobs: int) -> list[SamplingParams]:
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
        )
        if self.seed is None:
            return [base] * self.n
        return [dataclasses.replace(base, seed=self.seed + j) for j in range(self.n)]


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for completions
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False


class Message(BaseModel):
    role: Literal["system", "user", "assistant", "tool", "ipython"]
    content: str


class ChatCompletionRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
