"""Token sampling as pure functions on batched float32 logits, every row with its own settings as tensors:
`SamplingParams` (one request's settings, checked, with its `StructuredOutputs` constraint), `SamplingBatch` (a
batch's settings as tensors) and the stages of the one sampling pipeline (lamina.engine.sampler): logit bias,
penalties, the grammar's token mask, temperature with top-k/top-p/min-p, the draw, log-probabilities."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping, Sequence

import numpy as np
import torch

from lamina.errors import RequestError


def sample(
    logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Meta's sampling arguments on the pipeline's own stages: next token per row of logits [B, V], argmax where
    temperature [B] is 0, else a draw from softmax(logits / T) restricted to the nucleus (Meta's rule, see
    `truncate`), every row from `generator`. Returns [B] int64."""
    batch = SamplingBatch.of(temperature, top_p, logits.shape[-1])
    return draw(truncate(logits, batch), batch, [generator] * logits.shape[0])


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token] per row: logits [n, V] float32, tokens [n] -> [n]."""
    return torch.log_softmax(logits, dim=-1).gather(-1, tokens[:, None]).squeeze(-1)


@dataclass(frozen=True)
class StructuredOutputs:
    """A constraint on a request's output, as vLLM's `structured_outputs`: exactly one of

    - `json`: a JSON Schema (a dict, or its JSON text): the output is one JSON value that validates against it;
    - `json_object`: True for any JSON object (OpenAI's `response_format: {"type": "json_object"}`);
    - `regex`: a regular expression the whole output matches;
    - `choice`: strings, the output being exactly one of them;
    - `grammar`: a context-free grammar, in Lark syntax as llguidance reads it or in llama.cpp's GBNF.

    Checked for shape here; compiled (and a grammar that does not compile refused, naming the problem) when the
    request reaches the engine (lamina.engine.grammar). The schema is kept as compact JSON text, so equal constraints
    are equal and hash alike (the compiled grammars are cached by it)."""

    json: str | None = None
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    json_object: bool = False

    def __post_init__(self):
        given = [name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None]
        if not isinstance(self.json_object, bool):
            raise RequestError(f"json_object must be true or false, got {self.json_object!r}")
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise RequestError(
                "structured outputs take exactly one of json, json_object, regex, choice, grammar; "
                + (f"got {', '.join(given)}" if given else "got none")
            )
        if self.json is not None:
            schema = self.json
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except json.JSONDecodeError as e:
                    raise RequestError(f"the JSON schema is not valid JSON: {e}") from None
            if not isinstance(schema, (dict, bool)):
                raise RequestError(f"a JSON schema is an object (or true/false), got {type(schema).__name__}")
            # compact, but in the given key order: properties are generated in the order the schema lists them
            object.__setattr__(self, "json", json.dumps(schema, separators=(",", ":")))
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise RequestError(f"{name} must be a non-empty string, got {value!r:.80}")
        if self.choice is not None:
            if isinstance(self.choice, str) or not all(isinstance(c, str) and c for c in self.choice):
                raise RequestError(f"choice must be a list of non-empty strings, got {self.choice!r:.80}")
            if not self.choice:
                raise RequestError("choice must list at least one string")
            object.__setattr__(self, "choice", tuple(self.choice))

    @property
    def kind(self) -> str:
        return next(k for k in ("json", "regex", "choice", "grammar", "json_object") if getattr(self, k))

    @property
    def schema(self):
        """The JSON schema as a dict (json), {"type": "object"} for json_object, else None."""
        if self.json_object:
            return {"type": "object"}
        return None if self.json is None else json.loads(self.json)


@dataclass(frozen=True)
class SamplingParams:
    """One request's sampling settings, with the meanings of OpenAI's API and vLLM. Checked when made: a bad value
    raises RequestError naming the field and its range.

    temperature 0 is greedy. top_k 0 (or -1) and top_p 1 and min_p 0 are off. presence/frequency penalties (OpenAI)
    lower the logits of tokens already generated: by `presence` once, by `frequency` per occurrence. The repetition
    penalty (CTRL, as transformers and vLLM apply it) divides positive and multiplies negative logits of tokens seen in
    the prompt or the output. logit_bias adds to given token ids' logits. A seed makes the request's draws
    reproducible whatever else shares the batch. logprobs: report each new token's log-probability; top_logprobs:
    and that many most probable alternatives (which implies logprobs). prompt_logprobs (vLLM's): None for none, else
    each prompt token's log-probability given the tokens before it, with that many alternatives. max_tokens None: up
    to the context. ignore_eos: the model's stop tokens are generated like any
    other (stop_token_ids still stop)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: Mapping[int, float] = field(default_factory=dict, hash=False)
    seed: int | None = None
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0
    prompt_logprobs: int | None = None
    ignore_eos: bool = False
    n: int = 1
    structured_outputs: StructuredOutputs | None = None

    def __post_init__(self):
        _number("temperature", self.temperature, 0.0, None)
        _number("top_p", self.top_p, 0.0, 1.0, low_open=True)
        _integer("top_k", self.top_k, -1, None)
        _number("min_p", self.min_p, 0.0, 1.0)
        _number("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _number("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        _number("repetition_penalty", self.repetition_penalty, 0.0, None, low_open=True)
        if not isinstance(self.logit_bias, Mapping):
            raise RequestError(f"logit_bias must map token ids to numbers, got {type(self.logit_bias).__name__}")
        for token, bias in self.logit_bias.items():
            _integer("logit_bias token id", token, 0, None)
            _number(f"logit_bias[{token}]", bias, -100.0, 100.0)
        object.__setattr__(self, "logit_bias", MappingProxyType({int(k): float(v) for k, v in self.logit_bias.items()}))
        if self.seed is not None:
            _integer("seed", self.seed, -(2**63), 2**64 - 1)
        if self.max_tokens is not None:
            _integer("max_tokens", self.max_tokens, 1, None)
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        if not all(isinstance(s, str) and s for s in self.stop):
            raise RequestError(f"stop must be non-empty strings, got {self.stop!r}")
        object.__setattr__(self, "stop", tuple(self.stop))
        for token in self.stop_token_ids:
            _integer("stop_token_ids entry", token, 0, None)
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if not isinstance(self.logprobs, bool):
            raise RequestError(f"logprobs must be true or false, got {self.logprobs!r}")
        _integer("top_logprobs", self.top_logprobs, 0, MAX_TOP_LOGPROBS)
        if self.top_logprobs:  # alternatives come with the chosen token's own log-probability
            object.__setattr__(self, "logprobs", True)
        if self.prompt_logprobs is not None:
            _integer("prompt_logprobs", self.prompt_logprobs, 0, MAX_TOP_LOGPROBS)
        if not isinstance(self.ignore_eos, bool):
            raise RequestError(f"ignore_eos must be true or false, got {self.ignore_eos!r}")
        _integer("n", self.n, 1, None)
        if isinstance(self.structured_outputs, Mapping):
            object.__setattr__(self, "structured_outputs", StructuredOutputs(**self.structured_outputs))
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputs):
            raise RequestError(
                f"structured_outputs must be StructuredOutputs or a dict, got {type(self.structured_outputs).__name__}"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def check_vocabulary(self, vocab_size: int) -> None:
        """The token ids this request names (logit_bias) must exist in the model's vocabulary."""
        for token in self.logit_bias:
            if token >= vocab_size:
                raise RequestError(f"logit_bias token id {token} is not in the vocabulary (size {vocab_size})")


MAX_TOP_LOGPROBS = 20  # as OpenAI's API


def _number(name: str, value, low: float, high: float | None, *, low_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestError(f"{name} must be a finite number, got {value!r}")
    if value < low or (low_open and value == low) or (high is not None and value > high):
        bounds = f"{'(' if low_open else '['}{low:g}, {'inf)' if high is None else f'{high:g}]'}"
        raise RequestError(f"{name} must be in {bounds}, got {value!r}")


def _integer(name: str, value, low: int, high: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        raise RequestError(f"{name} must be between {low} and {'any' if high is None else high}, got {value}")


@dataclass(frozen=True)
class SamplingBatch:
    """The settings of B requests as tensors on the logits' device, row b for request b (`from_params`: a few small
    tensors, built for each step's sampling rows)."""

    temperature: torch.Tensor  # [B] float32; 0: greedy
    top_k: torch.Tensor  # [B] int64; vocab size where off
    top_p: torch.Tensor  # [B] float32
    min_p: torch.Tensor  # [B] float32
    presence: torch.Tensor  # [B] float32
    frequency: torch.Tensor  # [B] float32
    repetition: torch.Tensor  # [B] float32
    bias_rows: torch.Tensor  # [n] int64: logit_bias entries as (row, token, value)
    bias_tokens: torch.Tensor  # [n] int64
    bias_values: torch.Tensor  # [n] float32
    # Which stages any row needs: the others are skipped.
    penalties: bool
    truncation: bool

    @classmethod
    def of(cls, temperature: torch.Tensor, top_p: torch.Tensor, vocab_size: int) -> "SamplingBatch":
        """Temperature and top-p only, as [B] tensors (the other stages off)."""
        B, device = temperature.shape[0], temperature.device
        zeros = torch.zeros(B, dtype=torch.float32, device=device)
        none = torch.zeros(0, dtype=torch.long, device=device)
        return cls(
            temperature=temperature.float(),
            top_k=torch.full((B,), vocab_size, dtype=torch.long, device=device),
            top_p=top_p.float(),
            min_p=zeros,
            presence=zeros,
            frequency=zeros,
            repetition=torch.ones(B, dtype=torch.float32, device=device),
            bias_rows=none,
            bias_tokens=none,
            bias_values=none.float(),
            penalties=False,
            truncation=bool((top_p < 1).any()),
        )

    @classmethod
    def from_params(cls, params: Sequence[SamplingParams], vocab_size: int, device) -> "SamplingBatch":
        def column(values, dtype=torch.float32):
            return torch.tensor(values, dtype=dtype, device=device)

        for p in params:
            p.check_vocabulary(vocab_size)
        bias = [(row, token, value) for row, p in enumerate(params) for token, value in p.logit_bias.items()]
        rows, tokens, values = zip(*bias) if bias else ((), (), ())
        return cls(
            temperature=column([p.temperature for p in params]),
            top_k=column([min(p.top_k, vocab_size) if p.top_k > 0 else vocab_size for p in params], torch.long),
            top_p=column([p.top_p for p in params]),
            min_p=column([p.min_p for p in params]),
            presence=column([p.presence_penalty for p in params]),
            frequency=column([p.frequency_penalty for p in params]),
            repetition=column([p.repetition_penalty for p in params]),
            bias_rows=column(rows, torch.long),
            bias_tokens=column(tokens, torch.long),
            bias_values=column(values),
            penalties=any(p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1 for p in params),
            truncation=any(p.top_k > 0 or p.top_p < 1 or p.min_p > 0 for p in params),
        )


def apply_logit_bias(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """logits [B, V] plus each request's logit_bias (a new tensor)."""
    if batch.bias_rows.numel() == 0:
        return logits
    return logits.index_put((batch.bias_rows, batch.bias_tokens), batch.bias_values, accumulate=True)


def apply_penalties(
    logits: torch.Tensor, output_counts: torch.Tensor, seen: torch.Tensor, batch: SamplingBatch
) -> torch.Tensor:
    """Repetition penalty over the tokens `seen` [B, V] bool (prompt or output), then presence and frequency
    penalties over the output tokens, counted in `output_counts` [B, V]. Returns a new tensor."""
    if not batch.penalties:
        return logits
    r = batch.repetition[:, None]
    logits = torch.where(seen, torch.where(logits > 0, logits / r, logits * r), logits)
    counts = output_counts.to(logits.dtype)
    return logits - batch.frequency[:, None] * counts - batch.presence[:, None] * (counts > 0).to(logits.dtype)


def unpack_token_mask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """A grammar's allowed tokens as bool [n, vocab_size], from llguidance's bitmask [n, W] int32 on the CPU (bit j
    of word w: token 32 w + j). Ids beyond the mask's 32 W are not allowed."""
    # little-endian words: byte k of word w holds tokens 32 w + 8 k .. + 7, lowest bit first
    bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little")  # [n, 32 W] of 0/1
    allowed = torch.from_numpy(bits).view(torch.bool)
    if allowed.shape[1] >= vocab_size:
        return allowed[:, :vocab_size]
    return torch.nn.functional.pad(allowed, (0, vocab_size - allowed.shape[1]))


def apply_token_mask(logits: torch.Tensor, rows: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """logits [B, V] with the tokens a grammar forbids at -inf: `allowed` [n, V] bool for rows `rows` [n] int64
    (the others are unconstrained). Returns a new tensor."""
    if rows.numel() == 0:
        return logits
    if rows.numel() == logits.shape[0]:  # every row constrained, in order
        return torch.where(allowed, logits, -math.inf)
    masked = logits.clone()
    masked[rows] = torch.where(allowed, logits[rows], -math.inf)
    return masked


def truncate(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """logits / temperature, then top-k, top-p (Meta's rule: the most probable tokens up to and including the first
    whose cumulative probability reaches top_p) and min-p, in transformers' order; removed tokens get -inf. Greedy
    rows come back unchanged."""
    sampling = batch.temperature > 0
    temperature = torch.where(sampling, batch.temperature, 1.0)[:, None]
    scaled = logits / temperature
    # A tiny temperature overflows to inf (and softmax to nan): those rows are shifted by their maximum first, which
    # softmax does not see.
    overflow = (torch.isposinf(scaled) | torch.isnan(scaled)).any(dim=-1, keepdim=True)
    if bool(overflow.any()):
        scaled = torch.where(overflow, (logits - logits.amax(dim=-1, keepdim=True)) / temperature, scaled)
    if not batch.truncation:
        return torch.where(sampling[:, None], scaled, logits)
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    # top-k: keep the k largest (and ties with the k-th)
    kth = sorted_logits.gather(-1, (batch.top_k - 1).clamp(min=0)[:, None])
    sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, -math.inf)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    sorted_logits = sorted_logits.masked_fill(mass_before > batch.top_p[:, None], -math.inf)
    probs = torch.softmax(sorted_logits, dim=-1)  # min-p on what is left, as transformers applies it after top-p
    sorted_logits = sorted_logits.masked_fill(probs < batch.min_p[:, None] * probs[:, :1], -math.inf)
    truncated = torch.empty_like(scaled).scatter_(-1, order, sorted_logits)
    return torch.where(sampling[:, None], truncated, logits)


def draw(logits: torch.Tensor, batch: SamplingBatch, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """One token per row of processed logits [B, V]: argmax for greedy rows, else a draw from softmax(logits),
    each row with its own generator (None: torch's default), so a seeded request draws the same tokens whatever else
    is in the batch. Draws by the exponential race (argmax of p / E with E ~ Exp(1)): one vector op per row for the
    noise, no sorting."""
    return race(logits, batch, generators).argmax(dim=-1)


def race(logits: torch.Tensor, batch: SamplingBatch, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """The scores [B, V] whose argmax `draw` takes: the logits themselves for greedy rows, p / E for the others (the
    generators advance as in `draw`)."""
    sampling = batch.temperature > 0
    if not bool(sampling.any()):
        return logits
    probs = torch.softmax(logits, dim=-1)
    noise = torch.ones_like(probs)  # greedy rows draw nothing (their result is the argmax)
    for row, (generator, sampled_row) in enumerate(zip(generators, sampling.tolist(), strict=True)):
        if sampled_row:
            noise[row].exponential_(generator=generator)
    return torch.where(sampling[:, None], probs / noise, logits)


def decided(scores: torch.Tensor, batch: SamplingBatch, margin: float) -> torch.Tensor:
    """[B] bool: whether each row's winner in `race`'s scores leads by more than `margin` (greedy rows: logits apart;
    sampled rows: as a fraction of the winner's score), so that float rounding of up to `margin` in the logits
    (another batch's kernels) could not have changed it."""
    top = scores.topk(2, dim=-1).values
    greedy = top[:, 0] - top[:, 1] > margin
    sampled = top[:, 1] < top[:, 0] * (1 - margin)
    return torch.where(batch.temperature > 0, sampled, greedy)


def top_logprobs(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most probable tokens of each row of raw logits [B, V]: (log-probabilities [B, k], ids [B, k])."""
    return torch.log_softmax(logits, dim=-1).topk(k, dim=-1)
