"""Request: one request's whole state as it moves through the engine core (queue, batch, KV blocks, sampler, output
text), and RequestOutput, what a step reports for it. Nothing else keeps per-request state."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, Callable, Hashable

from lamina.engine.sampling import SamplingParams

if TYPE_CHECKING:  # the scheduler imports this module and uses no tensors
    import torch

    from lamina.tokenizer import StreamDecoder

TopLogprobs = tuple[tuple[int, float], ...]  # (token id, log-probability), most probable first
PromptLogprob = tuple[float, TopLogprobs]  # a prompt token's log-probability given those before it, and alternatives


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(frozen=True)
class RequestOutput:
    """What one step did for one request: a new token and the text it completes (stop strings cut off and text that
    may still become one held back), or only a finish reason ("stop", "length"; "abort" when the engine was stopped;
    "error" with `error` when the step failed). logprob and top_logprobs are None unless the request's
    SamplingParams ask for them. `prompt_logprobs` comes once, on a request's first output, when asked for: one entry
    per prompt token, None for the first. A request whose structured-output constraint is complete finishes with
    "stop"; one cut short finishes with "length" (or "stop" at a stop string) and `constraint_unmet`."""

    request_id: Hashable
    token: int | None
    text: str
    logprob: float | None
    top_logprobs: TopLogprobs | None
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    prompt_logprobs: tuple[PromptLogprob | None, ...] | None = None
    error: BaseException | None = None
    cached_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache
    # structured output: the request's last output, finished before its constraint was complete (max_tokens or a
    # stop string came first), so that its text is not a valid output
    constraint_unmet: bool = False
    # The stop token that finished the request ("stop"), which is not part of the completion (Meta's rule: `token`
    # is None), with its log-probability and alternatives when asked for: OpenAI's API gives it an entry in a
    # choice's logprobs (the choice's text stays without it), and clients such as lm-eval count on that entry.
    stop_token: int | None = None
    stop_logprob: float | None = None
    stop_top_logprobs: TopLogprobs | None = None


@dataclass(eq=False)
class Request:
    """A request and everything the engine knows of it.

    Made by a front end with its prompt, settings and budget; `EngineCore.add` fills in the rest. `max_tokens`: new
    tokens at most (None: `params.max_tokens`, else what the context leaves; 0: only score the prompt). `stop_ids`:
    the model's stop tokens for this request (empty with ignore_eos); `params.stop_token_ids` join them when made.
    `sink`: called with each of its outputs, from whichever thread steps the engine."""

    request_id: Hashable
    prompt: list[int]
    params: SamplingParams
    max_tokens: int | None = None
    stop_ids: frozenset[int] = frozenset()
    sink: Callable[[RequestOutput], Any] | None = None
    # the scheduler's and the block pool's
    output: list[int] = field(default_factory=list)
    computed: int = 0  # leading tokens whose keys and values are in the cache
    blocks: list[int] = field(default_factory=list)  # KV-cache blocks holding its positions, in order
    status: Status = Status.WAITING
    finish_reason: str | None = None
    preemptions: int = 0
    # prefix caching: keys of its full blocks of tokens (blocks.block_keys), how many of its blocks are published,
    # and how many prompt tokens its first admission found cached
    block_keys: list[int] = field(default_factory=list)
    published: int = 0
    cached_tokens: int | None = None
    # the sampler's
    generator: torch.Generator | None = None
    counts: torch.Tensor | None = None  # [V] output token counts, for presence/frequency penalties
    seen: torch.Tensor | None = None  # [V] prompt and output tokens, for the repetition penalty
    prompt_logprobs: list[PromptLogprob] = field(default_factory=list)  # of prompt tokens 1.., as scored so far
    matcher: Any = None  # llguidance.LLMatcher following the output, for a request with structured_outputs
    # speculative decoding's (lamina.engine.speculative): the tokens proposed to follow its last one, verified by the
    # next step; how many leading positions the draft model's cache holds; its acceptance so far, and its back-off
    draft: list[int] = field(default_factory=list)
    draft_computed: int = 0
    spec: Any = None  # speculative.Acceptance, made at its first proposal
    # the output processor's
    decoder: StreamDecoder | None = None
    text: str = ""  # everything decoded so far
    emitted: int = 0  # text[:emitted] has been reported
    reported_prompt: bool = False

    def __post_init__(self):
        self.stop_ids = frozenset(self.stop_ids) | frozenset(self.params.stop_token_ids)

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.output)

    @property
    def pending(self) -> int:
        """Tokens to run before the next token can be sampled."""
        return self.num_tokens - self.computed

    def scored_positions(self, start: int, length: int, limit: int | None = None) -> range:
        """Positions up to start+length-1 whose hidden states score the next prompt token and are not scored yet
        (none unless the request asks for prompt logprobs), at most `limit` of them. Those before `start` were not
        run by this request: their blocks came from the prefix cache, which keeps their hidden states too."""
        if self.params.prompt_logprobs is None:
            return range(0)
        first = len(self.prompt_logprobs)
        stop = min(start + length, len(self.prompt) - 1)
        return range(first, stop if limit is None else min(stop, first + limit))

    @property
    def scoring_behind(self) -> int:
        """Positions already computed (blocks from the prefix cache) whose prompt logprobs are still owed."""
        if self.params.prompt_logprobs is None:
            return 0
        return max(0, min(self.computed, len(self.prompt) - 1) - len(self.prompt_logprobs))
