"""Llama: Meta's Llama 3 generation API (`build`, `generate`, `text_completion`, `chat_completion`) on lamina's engine.

Semantics follow Meta's reference, with its defects fixed: each prompt is prefilled at its own length in one pass,
finished sequences drop out of the batch, logits are computed only where used, a stop token inside an echoed prompt
does not cut it, and bad input raises a ValueError (RequestError) before any work is done.
"""

from __future__ import annotations

import itertools
import math
import numbers
import operator
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal, Sequence

import torch

from lamina.engine.config import EngineConfig, resolve_device, resolve_dtype
from lamina.engine.runner import ModelRunner
from lamina.engine.sampling import sample, token_logprobs
from lamina.errors import CapacityError, ConfigError, RequestError, TokenizerError, WeightsError
from lamina.model import Transformer, build_transformer
from lamina.tokenizer import ChatFormat, ChatTemplate, Dialog, Llama3Tokenizer, StreamDecoder, Tokenizer
from lamina.weights import load_meta_checkpoint

# Rows of logits materialised at once when scoring a prompt (echo with logprobs): bounds memory at rows * vocab.
_SCORE_CHUNK = 256


@dataclass(frozen=True)
class Completion:
    """One sequence's result. `tokens`/`logprobs` are the generated part only, without the stop token."""

    prompt: list[int]
    tokens: list[int]
    logprobs: list[float] | None
    prompt_logprobs: list[float] | None  # teacher-forced, 0.0 for the first token; only when asked for
    finish_reason: Literal["stop", "length"]


@dataclass(frozen=True)
class StreamDelta:
    """What one new token of sequence `index` adds. `token` is None on the delta that reports a stop token."""

    index: int
    text: str
    token: int | None
    logprob: float | None
    finish_reason: Literal["stop", "length"] | None


@dataclass(frozen=True)
class _Request:
    prompts: list[list[int]]
    budgets: list[int]  # new tokens each prompt may get
    temperature: float
    top_p: float
    generator: torch.Generator
    stop_tokens: frozenset[int]  # empty when the caller asked to ignore stop tokens


@dataclass(frozen=True)
class _TokenEvent:
    index: int
    token: int | None
    logprob: float | None
    finish_reason: Literal["stop", "length"] | None


class Llama:
    """A loaded model, its tokenizer and chat format, and an engine to generate with.

    Build one with `lamina.load(path)` (any format) or `Llama.build(...)` (Meta's signature)."""

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        config: EngineConfig,
        *,
        formatter: ChatFormat | ChatTemplate | None = None,
        seed: int = 1,
    ):
        if model.config.vocab_size < tokenizer.n_words:
            raise TokenizerError(
                f"the tokenizer has {tokenizer.n_words} tokens but the model's vocabulary has only "
                f"{model.config.vocab_size}: they do not belong together"
            )
        self.model = model
        self.tokenizer = tokenizer
        # Without a template of its own, a model whose vocabulary has Llama 3's header tokens gets Llama 3's format.
        if formatter is None and ChatFormat.supports(tokenizer):
            formatter = ChatFormat(tokenizer)
        self.formatter = formatter
        self.config = config
        self.runner = ModelRunner(model, config, compile=config.compile)
        # The session's random stream: calls without their own seed draw from it, so a run is reproducible from
        # build(seed=...) without touching torch's global generator.
        self.generator = new_generator(seed, config.device, ConfigError)

    @property
    def stop_tokens(self) -> set[int]:
        """Token ids that end a sequence: the tokenizer's, plus the end-of-turn tokens of the chat template."""
        return set(self.tokenizer.stop_tokens) | set(getattr(self.formatter, "stop_tokens", ()))

    @staticmethod
    def build(
        ckpt_dir: str | Path,
        tokenizer_path: str | Path,
        max_seq_len: int,
        max_batch_size: int,
        model_parallel_size: int | None = None,
        seed: int = 1,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> "Llama":
        """Load a Meta checkpoint (`params.json` + `consolidated.*.pth`, shards merged) and a Llama 3
        `tokenizer.model`, with Meta's signature. device: CUDA when available, else CPU; dtype: bfloat16 on CUDA,
        float32 on CPU. `model_parallel_size` is accepted for compatibility; only 1 (one process) is supported."""
        if model_parallel_size not in (None, 1):
            raise ConfigError(f"model_parallel_size={model_parallel_size}: lamina runs a model in one process here")
        device = resolve_device(device)
        config = EngineConfig(max_seq_len, max_batch_size, device, resolve_dtype(dtype, device))
        if not Path(ckpt_dir).is_dir():  # say so before the tokenizer is checked, and the weights read
            raise WeightsError(f"checkpoint directory not found: {ckpt_dir}")
        tokenizer = Llama3Tokenizer(tokenizer_path)
        model_config, state_dict = load_meta_checkpoint(ckpt_dir)
        model = build_transformer(model_config, state_dict, device=config.device, dtype=config.dtype)
        return Llama(model, tokenizer, config, seed=seed)

    @staticmethod
    def from_pretrained(path: str | Path | None = None, **kwargs) -> "Llama":
        """Alias of `lamina.load`: any format, detected from the path (None: the default model)."""
        from lamina.engine.loader import load  # load builds a Llama: import at call time to keep the modules acyclic

        return load(path, **kwargs)

    # ----------------------------------------------------------------------------------------------------------
    # Generation

    def generate(
        self,
        prompt_tokens: Sequence[Sequence[int]],
        max_gen_len: int | None = None,
        temperature: float = 0.6,
        top_p: float = 0.9,
        logprobs: bool = False,
        echo: bool = False,
        *,
        seed: int | None = None,
    ) -> tuple[list[list[int]], list[list[float]] | None]:
        """Continue each prompt; returns (tokens, logprobs) as Meta's `generate` does.

        Each sequence stops at its first stop token (not returned) or after `max_gen_len` new tokens (None: until
        its context of `max_seq_len` is full). temperature 0 is greedy. logprobs are log-softmax of the raw logits.
        With echo, the prompt comes first, with its teacher-forced logprobs (0.0 for the first token)."""
        results = self.complete(prompt_tokens, max_gen_len, temperature, top_p, logprobs, echo, seed=seed)
        tokens = [(r.prompt + r.tokens) if echo else r.tokens for r in results]
        if not logprobs:
            return tokens, None
        return tokens, [(r.prompt_logprobs + r.logprobs) if echo else r.logprobs for r in results]

    def complete(
        self,
        prompt_tokens: Sequence[Sequence[int]],
        max_gen_len: int | None = None,
        temperature: float = 0.6,
        top_p: float = 0.9,
        logprobs: bool = False,
        echo: bool = False,
        *,
        seed: int | None = None,
        ignore_eos: bool = False,
    ) -> list[Completion]:
        """`generate` returning a `Completion` per prompt (with its finish reason). With `ignore_eos`, stop tokens
        are generated like any other and every sequence runs to its length limit (for benchmarks)."""
        request = self._request(prompt_tokens, max_gen_len, temperature, top_p, seed, ignore_eos)
        B = len(request.prompts)
        out: list[list[int]] = [[] for _ in range(B)]
        out_lp: list[list[float]] = [[] for _ in range(B)]
        prompt_lp: list[list[float] | None] = [None] * B
        finish = ["length"] * B
        for event in self._events(request, logprobs, prompt_lp if logprobs and echo else None):
            if event.token is not None:
                out[event.index].append(event.token)
                if logprobs:
                    out_lp[event.index].append(event.logprob)
            if event.finish_reason is not None:
                finish[event.index] = event.finish_reason
        return [
            Completion(p, out[i], out_lp[i] if logprobs else None, prompt_lp[i], finish[i])
            for i, p in enumerate(request.prompts)
        ]

    def stream(
        self,
        prompt_tokens: Sequence[Sequence[int]],
        max_gen_len: int | None = None,
        temperature: float = 0.6,
        top_p: float = 0.9,
        *,
        logprobs: bool = False,
        seed: int | None = None,
        ignore_eos: bool = False,
    ) -> Iterator[StreamDelta]:
        """Generate as `generate` does, yielding a `StreamDelta` for each sequence's every new token as it is made.

        `delta.text` is the text that became final with that token: it is empty while a character is still split
        across tokens, so the pieces never hold broken UTF-8; their concatenation is the sequence's whole text.
        Each sequence's last delta carries its `finish_reason`. The request is checked before this returns."""
        request = self._request(prompt_tokens, max_gen_len, temperature, top_p, seed, ignore_eos)
        return self._stream(request, logprobs)

    def _stream(self, request: _Request, logprobs: bool) -> Iterator[StreamDelta]:
        decoders = [StreamDecoder(self.tokenizer) for _ in request.prompts]
        for event in self._events(request, logprobs, None):
            decoder = decoders[event.index]
            text = decoder.add(event.token) if event.token is not None else ""
            if event.finish_reason is not None:
                text += decoder.flush()
            yield StreamDelta(event.index, text, event.token, event.logprob, event.finish_reason)

    def _events(self, request: _Request, logprobs: bool, prompt_lp: list | None) -> Iterator[_TokenEvent]:
        """The generation loop. Yields one event per sampled token of each running sequence: the token (None when it
        is a stop token, which is never returned), its logprob when asked, and the finish reason on the last one; a
        sequence allowed no new tokens gets a single event with finish reason "length". With `prompt_lp` (a list per
        prompt), fills in the prompts' teacher-forced logprobs first.

        The sequences hold KV-cache rows from the runner's pool for as long as the loop runs (until it finishes or
        the generator is closed), so concurrent generations on one Llama never share rows."""
        prompts, budgets = request.prompts, request.budgets
        for i, budget in enumerate(budgets):
            if budget == 0:
                yield _TokenEvent(i, None, None, "length")
        active = [i for i, budget in enumerate(budgets) if budget > 0]
        # Prefill only prompts that generate, unless every prompt is to be scored.
        prefilled = list(range(len(prompts))) if prompt_lp is not None else active
        if not prefilled:
            return
        with self.runner.slots(len(prefilled)) as slots:
            slot = dict(zip(prefilled, slots))
            with torch.inference_mode():
                hidden = self.runner.prefill([prompts[i] for i in prefilled], [[s] for s in slots])
            ends = dict(zip(prefilled, itertools.accumulate(len(prompts[i]) for i in prefilled)))
            if prompt_lp is not None:
                for i, p in enumerate(prompts):
                    prompt_lp[i] = [0.0] + self._score(hidden[ends[i] - len(p) : ends[i] - 1], p[1:])
            if not active:
                return
            with torch.inference_mode():
                logits = self.model.logits(hidden[[ends[i] - 1 for i in active]])
            del hidden
            yield from self._decode_loop(request, logprobs, active, slot, logits)

    def _decode_loop(self, request: _Request, logprobs: bool, active: list[int], slot: dict, logits: torch.Tensor):
        prompts, budgets, device = request.prompts, request.budgets, self.config.device
        stop_ids = torch.tensor(sorted(request.stop_tokens), dtype=torch.long, device=device)
        generated = dict.fromkeys(active, 0)
        while active:
            with torch.inference_mode():
                if request.temperature == 0:
                    next_tokens = logits.argmax(dim=-1)
                else:
                    n = len(active)
                    temps = torch.full((n,), request.temperature, dtype=torch.float32, device=device)
                    top_ps = torch.full((n,), request.top_p, dtype=torch.float32, device=device)
                    next_tokens = sample(logits, temps, top_ps, request.generator)
                # One host transfer per step: the tokens, whether each is a stop token, and its logprob.
                columns = [next_tokens.double(), torch.isin(next_tokens, stop_ids).double()]
                if logprobs:
                    columns.append(token_logprobs(logits, next_tokens).double())
                rows = torch.stack(columns, dim=1).tolist()
            still = []
            for i, row in zip(active, rows):
                tok, stop, lp = int(row[0]), row[1] > 0, (row[2] if logprobs else None)
                if stop:
                    yield _TokenEvent(i, None, None, "stop")
                    continue
                generated[i] += 1
                finished = generated[i] >= budgets[i]
                yield _TokenEvent(i, tok, lp, "length" if finished else None)
                if not finished:
                    still.append((i, tok))
            active = [i for i, _ in still]
            if active:
                with torch.inference_mode():
                    logits = self.runner.decode(
                        tokens=[tok for _, tok in still],
                        tables=[[slot[i]] for i in active],
                        positions=[len(prompts[i]) + generated[i] - 1 for i in active],
                    )

    @torch.inference_mode()
    def _score(self, hidden: torch.Tensor, targets: Sequence[int]) -> list[float]:
        """Log-probabilities of `targets[j]` given hidden state row j, computed a chunk of rows at a time."""
        scores: list[float] = []
        for start in range(0, len(targets), _SCORE_CHUNK):
            logits = self.model.logits(hidden[start : start + _SCORE_CHUNK])
            chunk = torch.tensor(targets[start : start + _SCORE_CHUNK], device=logits.device)
            scores.extend(token_logprobs(logits, chunk).tolist())
        return scores

    # ----------------------------------------------------------------------------------------------------------
    # Text and chat, as Meta's reference returns them

    def text_completion(
        self,
        prompts: Sequence[str],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: int | None = None,
        logprobs: bool = False,
        echo: bool = False,
        *,
        seed: int | None = None,
    ) -> list[dict]:
        """Complete each text prompt: [{"generation": str, and with logprobs "tokens": [str], "logprobs": [float]}]."""
        if (
            not isinstance(prompts, Sequence)
            or isinstance(prompts, str)
            or not all(isinstance(p, str) for p in prompts)
        ):
            raise RequestError("prompts must be a list of strings")
        prompt_tokens = [self.tokenizer.encode(p, bos=self.tokenizer.add_bos, eos=False) for p in prompts]
        tokens, lps = self.generate(prompt_tokens, max_gen_len, temperature, top_p, logprobs, echo, seed=seed)
        return [self._prediction(self.tokenizer.decode(t), t, lp) for t, lp in zip(tokens, lps or [None] * len(tokens))]

    def chat_completion(
        self,
        dialogs: Sequence[Dialog],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: int | None = None,
        logprobs: bool = False,
        *,
        seed: int | None = None,
    ) -> list[dict]:
        """Reply to each dialog: [{"generation": {"role": "assistant", "content": str}, ...}]."""
        prompt_tokens = [self.encode_dialog(d) for d in self._check_dialogs(dialogs)]
        tokens, lps = self.generate(prompt_tokens, max_gen_len, temperature, top_p, logprobs, seed=seed)
        return [
            self._prediction({"role": "assistant", "content": self.tokenizer.decode(t)}, t, lp)
            for t, lp in zip(tokens, lps or [None] * len(tokens))
        ]

    def encode_dialog(self, dialog: Dialog) -> list[int]:
        """Prompt token ids for a dialog, through the model's chat template (or Llama 3's format)."""
        if self.formatter is None:
            raise RequestError("this model has no chat template, and its vocabulary lacks Llama 3's chat tokens")
        return self.formatter.encode_dialog_prompt(dialog)

    @staticmethod
    def _check_dialogs(dialogs) -> Sequence[Dialog]:
        if isinstance(dialogs, (str, dict)) or not isinstance(dialogs, Sequence):
            raise RequestError("dialogs must be a list of dialogs, each a list of messages")
        return dialogs

    def _prediction(self, generation, tokens: list[int], lps: list[float] | None) -> dict:
        if lps is None:
            return {"generation": generation}
        return {"generation": generation, "tokens": [self.tokenizer.decode([t]) for t in tokens], "logprobs": lps}

    # ----------------------------------------------------------------------------------------------------------
    # Input checks: all before any work

    def _request(self, prompt_tokens, max_gen_len, temperature, top_p, seed, ignore_eos=False) -> _Request:
        prompts = self._check_prompts(prompt_tokens)
        budgets = self._check_budgets(prompts, max_gen_len)
        temperature, top_p = _check_sampling(temperature, top_p)
        generator = self.generator if seed is None else new_generator(seed, self.config.device, RequestError)
        stops = frozenset() if ignore_eos else frozenset(self.stop_tokens)
        return _Request(prompts, budgets, temperature, top_p, generator, stops)

    def _check_prompts(self, prompt_tokens) -> list[list[int]]:
        prompt_tokens = _as_list(prompt_tokens)
        if not isinstance(prompt_tokens, list):
            raise RequestError(f"prompt_tokens must be a list of token-id lists, got {type(prompt_tokens).__name__}")
        if len(prompt_tokens) > self.config.max_batch_size:
            raise CapacityError(
                f"batch has {len(prompt_tokens)} prompts; max_batch_size is {self.config.max_batch_size}"
            )
        vocab = self.model.config.vocab_size
        prompts = []
        for i, prompt in enumerate(prompt_tokens):
            prompt = _as_list(prompt)
            if not isinstance(prompt, list):
                raise RequestError(f"prompt {i} must be a list of token ids, got {type(prompt).__name__}")
            if len(prompt) == 0:
                raise RequestError(f"prompt {i} is empty; a prompt needs at least one token (e.g. <|begin_of_text|>)")
            try:
                ids = [_integer(t) for t in prompt]
            except TypeError:
                raise RequestError(f"prompt {i} holds a token id that is not an integer") from None
            bad = next((t for t in ids if not 0 <= t < vocab), None)
            if bad is not None:
                raise RequestError(f"prompt {i} holds token id {bad}, outside the vocabulary [0, {vocab})")
            if len(ids) > self.config.max_seq_len:
                raise CapacityError(f"prompt {i} has {len(ids)} tokens; max_seq_len is {self.config.max_seq_len}")
            prompts.append(ids)
        return prompts

    def _check_budgets(self, prompts: list[list[int]], max_gen_len) -> list[int]:
        """New tokens each prompt may get: max_gen_len, or with None whatever its context has left."""
        limit = self.config.max_seq_len
        if max_gen_len is None:
            return [limit - len(p) for p in prompts]
        try:
            value = _integer(max_gen_len)
        except TypeError:
            value = -1
        if value < 0:
            raise RequestError(f"max_gen_len must be a non-negative integer or None, got {max_gen_len!r}")
        max_gen_len = value
        for i, p in enumerate(prompts):
            if len(p) + max_gen_len > limit:
                raise CapacityError(
                    f"prompt {i} has {len(p)} tokens and max_gen_len is {max_gen_len}: {len(p) + max_gen_len} "
                    f"tokens exceed max_seq_len {limit}"
                )
        return [max_gen_len] * len(prompts)


def _check_sampling(temperature, top_p) -> tuple[float, float]:
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not math.isfinite(temperature):
        raise RequestError(f"temperature must be a finite number, got {temperature!r}")
    if temperature < 0:
        raise RequestError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if isinstance(top_p, bool) or not isinstance(top_p, numbers.Real) or not 0 < top_p <= 1:
        raise RequestError(f"top_p must be in (0, 1], got {top_p!r}")
    return float(temperature), float(top_p)


def new_generator(seed, device: torch.device, error: type[Exception]) -> torch.Generator:
    """A torch.Generator on `device` seeded with `seed` (any integer torch accepts), or `error` naming the seed."""
    try:
        seed = _integer(seed)
    except TypeError:
        raise error(f"seed must be an integer, got {seed!r}") from None
    if not -(2**63) <= seed < 2**64:
        raise error(f"seed {seed} is out of range: it must fit in 64 bits")
    return torch.Generator(device=device).manual_seed(seed)


def _as_list(value):
    """Lists stay lists; tuples, numpy arrays and tensors become lists; anything else is returned unchanged."""
    if isinstance(value, (str, bytes)):
        return value
    if hasattr(value, "tolist"):
        return value.tolist()
    return list(value) if isinstance(value, tuple) else value


def _integer(value) -> int:
    """operator.index (ints, numpy and tensor integers), refusing bools."""
    if isinstance(value, bool):
        raise TypeError("a bool is not an integer here")
    return operator.index(value)
