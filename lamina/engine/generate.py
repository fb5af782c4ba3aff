"""Llama: Meta's Llama 3 generation API (`build`, `generate`, `text_completion`, `chat_completion`) on lamina's engine.

Semantics follow Meta's reference, with its defects fixed: each prompt is prefilled at its own length in one pass,
finished sequences drop out of the batch, logits are computed only where used, a stop token inside an echoed prompt
does not cut it, and bad input raises a ValueError (RequestError) before any work is done.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import torch

from lamina.engine.config import EngineConfig, resolve_device, resolve_dtype
from lamina.engine.runner import ModelRunner
from lamina.engine.sampling import sample, token_logprobs
from lamina.errors import CapacityError, RequestError, TokenizerError, WeightsError
from lamina.model import Transformer, build_transformer
from lamina.tokenizer import ChatFormat, Dialog, Llama3Tokenizer
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


class Llama:
    """A loaded model, its tokenizer and an engine to generate with. Build it with `Llama.build`."""

    def __init__(self, model: Transformer, tokenizer: Llama3Tokenizer, config: EngineConfig, *, seed: int = 1):
        if model.config.vocab_size < tokenizer.n_words:
            raise TokenizerError(
                f"the tokenizer has {tokenizer.n_words} tokens but the model's vocabulary has only "
                f"{model.config.vocab_size}: they do not belong together"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.formatter = ChatFormat(tokenizer)
        self.config = config
        self.runner = ModelRunner(model, config)
        # The session's random stream: calls without their own seed draw from it, so a run is reproducible from
        # build(seed=...) without touching torch's global generator.
        self.generator = torch.Generator(device=config.device).manual_seed(seed)

    @staticmethod
    def build(
        ckpt_dir: str | Path,
        tokenizer_path: str | Path,
        max_seq_len: int,
        max_batch_size: int,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        seed: int = 1,
    ) -> "Llama":
        """Load a Meta checkpoint (`params.json` + `consolidated.*.pth`, shards merged) and a Llama 3
        `tokenizer.model`. device: CUDA when available, else CPU; dtype: bfloat16 on CUDA, float32 on CPU."""
        device = resolve_device(device)
        config = EngineConfig(max_seq_len, max_batch_size, device, resolve_dtype(dtype, device))
        if not Path(ckpt_dir).is_dir():  # say so before the tokenizer is checked, and the weights read
            raise WeightsError(f"checkpoint directory not found: {ckpt_dir}")
        tokenizer = Llama3Tokenizer(tokenizer_path)
        model_config, state_dict = load_meta_checkpoint(ckpt_dir)
        model = build_transformer(model_config, state_dict, device=config.device, dtype=config.dtype)
        return Llama(model, tokenizer, config, seed=seed)

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

    @torch.inference_mode()
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
    ) -> list[Completion]:
        """`generate` returning a `Completion` per prompt (with its finish reason)."""
        prompts = self._check_prompts(prompt_tokens)
        budgets = self._check_budgets(prompts, max_gen_len)
        temperature, top_p = _check_sampling(temperature, top_p)
        if seed is not None and not isinstance(seed, int):
            raise RequestError(f"seed must be an int or None, got {seed!r}")
        generator = self.generator if seed is None else torch.Generator(self.config.device).manual_seed(seed)
        score_prompts = bool(logprobs and echo)

        B = len(prompts)
        out: list[list[int]] = [[] for _ in range(B)]
        out_lp: list[list[float]] = [[] for _ in range(B)]
        prompt_lp: list[list[float] | None] = [None] * B
        finish: list[str] = ["length"] * B
        active = [i for i in range(B) if budgets[i] > 0]
        if not active and not score_prompts:
            return [Completion(p, [], [] if logprobs else None, None, "length") for p in prompts]

        stop_ids = torch.tensor(self.tokenizer.stop_tokens, device=self.config.device)
        temps = torch.full((B,), temperature, device=self.config.device)
        top_ps = torch.full((B,), top_p, device=self.config.device)

        hidden = self.runner.prefill(prompts, list(range(B)))
        ends = torch.tensor([len(p) for p in prompts]).cumsum(0).tolist()
        if score_prompts:
            for i, p in enumerate(prompts):
                prompt_lp[i] = [0.0] + self._score(hidden[ends[i] - len(p) : ends[i] - 1], p[1:])
        logits = self.model.logits(hidden[[ends[i] - 1 for i in active]]) if active else None

        while active:
            rows = torch.tensor(active, device=self.config.device)
            next_tokens = sample(logits, temps[rows], top_ps[rows], generator)
            is_stop = torch.isin(next_tokens, stop_ids)
            lps = token_logprobs(logits, next_tokens).tolist() if logprobs else None
            still = []
            for j, (i, tok, stop) in enumerate(zip(active, next_tokens.tolist(), is_stop.tolist())):
                if stop:
                    finish[i] = "stop"
                    continue
                out[i].append(tok)
                if lps is not None:
                    out_lp[i].append(lps[j])
                if len(out[i]) < budgets[i]:
                    still.append(i)
            active = still
            if active:
                logits = self.runner.decode(
                    tokens=[out[i][-1] for i in active],
                    slots=active,
                    positions=[len(prompts[i]) + len(out[i]) - 1 for i in active],
                )
        return [
            Completion(prompts[i], out[i], out_lp[i] if logprobs else None, prompt_lp[i], finish[i]) for i in range(B)
        ]

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
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise RequestError("prompts must be a list of strings")
        prompt_tokens = [self.tokenizer.encode(p, bos=True, eos=False) for p in prompts]
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
        if isinstance(dialogs, (str, dict)):
            raise RequestError("dialogs must be a list of dialogs, each a list of messages")
        prompt_tokens = [self.formatter.encode_dialog_prompt(d) for d in dialogs]
        tokens, lps = self.generate(prompt_tokens, max_gen_len, temperature, top_p, logprobs, seed=seed)
        return [
            self._prediction({"role": "assistant", "content": self.tokenizer.decode(t)}, t, lp)
            for t, lp in zip(tokens, lps or [None] * len(tokens))
        ]

    def _prediction(self, generation, tokens: list[int], lps: list[float] | None) -> dict:
        if lps is None:
            return {"generation": generation}
        return {"generation": generation, "tokens": [self.tokenizer.decode([t]) for t in tokens], "logprobs": lps}

    # ----------------------------------------------------------------------------------------------------------
    # Input checks: all before any work

    def _check_prompts(self, prompt_tokens) -> list[list[int]]:
        if isinstance(prompt_tokens, (str, bytes)) or not isinstance(prompt_tokens, Sequence):
            raise RequestError(f"prompt_tokens must be a list of token-id lists, got {type(prompt_tokens).__name__}")
        if len(prompt_tokens) > self.config.max_batch_size:
            raise CapacityError(
                f"batch has {len(prompt_tokens)} prompts; max_batch_size is {self.config.max_batch_size}"
            )
        vocab = self.model.config.vocab_size
        prompts = []
        for i, prompt in enumerate(prompt_tokens):
            if isinstance(prompt, (str, bytes)) or not isinstance(prompt, Sequence):
                raise RequestError(f"prompt {i} must be a list of token ids, got {type(prompt).__name__}")
            if len(prompt) == 0:
                raise RequestError(f"prompt {i} is empty; a prompt needs at least one token (e.g. <|begin_of_text|>)")
            try:
                ids = [operator.index(t) for t in prompt]
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
        if isinstance(max_gen_len, bool) or not isinstance(max_gen_len, int) or max_gen_len < 0:
            raise RequestError(f"max_gen_len must be a non-negative integer or None, got {max_gen_len!r}")
        for i, p in enumerate(prompts):
            if len(p) + max_gen_len > limit:
                raise CapacityError(
                    f"prompt {i} has {len(p)} tokens and max_gen_len is {max_gen_len}: {len(p) + max_gen_len} "
                    f"tokens exceed max_seq_len {limit}"
                )
        return [max_gen_len] * len(prompts)


def _check_sampling(temperature, top_p) -> tuple[float, float]:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature):
        raise RequestError(f"temperature must be a finite number, got {temperature!r}")
    if temperature < 0:
        raise RequestError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise RequestError(f"top_p must be in (0, 1], got {top_p!r}")
    return float(temperature), float(top_p)
