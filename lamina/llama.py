"""Llama: Meta's Llama 3 generation API (`build`, `generate`, `text_completion`, `chat_completion`), plus `complete`
and `stream`, as a front end of the engine core: every call adds its prompts as requests to the model's one
EngineCore and steps it until they finish.

Semantics follow Meta's reference, with its defects fixed: each prompt is prefilled at its own length, finished
sequences drop out of the batch, logits are computed only where used, a stop token inside an echoed prompt does not
cut it, and bad input raises a ValueError (RequestError) before any work is done.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import operator
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal, Sequence

import torch

from lamina.engine import EngineConfig, EngineCore, Request, RequestOutput, SamplingParams, StructuredOutputs
from lamina.engine.config import resolve_device, resolve_dtype
from lamina.engine.runner import ModelRunner
from lamina.engine.speculative import SpeculativeConfig
from lamina import parallel
from lamina.errors import CapacityError, ConfigError, RequestError, TokenizerError, WeightsError
from lamina.model import Transformer, build_transformer
from lamina.tokenizer import ChatFormat, ChatTemplate, Dialog, Llama3Tokenizer, Tokenizer
from lamina.tokenizer.tools import Tool
from lamina.weights import load_meta_checkpoint


@dataclass(frozen=True)
class Completion:
    """One sequence's result. `tokens`/`logprobs` are the generated part only, without the stop token."""

    prompt: list[int]
    tokens: list[int]
    logprobs: list[float] | None
    prompt_logprobs: list[float] | None  # teacher-forced, 0.0 for the first token; only when asked for
    finish_reason: Literal["stop", "length"]
    constraint_unmet: bool = False  # structured output cut short (by max_gen_len): the text is not a valid output


@dataclass(frozen=True)
class StreamDelta:
    """What one new token of sequence `index` adds. `token` is None on the delta that reports a stop token."""

    index: int
    text: str
    token: int | None
    logprob: float | None
    finish_reason: Literal["stop", "length"] | None


@dataclass(frozen=True)
class _Call:
    """One generate/complete/stream call, checked: a prompt, a budget and a request's settings per sequence."""

    prompts: list[list[int]]
    budgets: list[int]  # new tokens each prompt may get
    params: SamplingParams


class Llama:
    """A loaded model, its tokenizer and chat format, and the engine core that generates with them.

    Build one with `lamina.load(path)` (any format) or `Llama.build(...)` (Meta's signature). Calls on one Llama may
    interleave (several `stream()` generators at once): each call's outputs are routed to it by request id."""

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        config: EngineConfig,
        *,
        formatter: ChatFormat | ChatTemplate | None = None,
        seed: int = 1,
        speculative: SpeculativeConfig | dict | str | None = None,
        draft_model: Transformer | None = None,
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
        # The session's seed: requests without their own seed draw seeds from it, so a run is reproducible from
        # build(seed=...) without touching torch's global generator.
        # Speculative decoding (lamina.engine.speculative): prompt lookup, or `draft_model` (the config's "model",
        # already loaded: lamina.load reads it and checks its tokenizer).
        if speculative is not None:
            speculative = SpeculativeConfig.parse(speculative)
            if (speculative.method == "draft_model") != (draft_model is not None):
                raise ConfigError("speculative_config: a draft model is given with method 'draft_model', and only then")
        self.core = EngineCore(
            model,
            tokenizer,
            config,
            seed=check_seed(seed, ConfigError),
            speculative=speculative,
            draft_model=draft_model,
        )
        self._held = 0  # sequences of this object's calls still running (at most max_batch_size)
        self._ids = 0

    @property
    def runner(self) -> ModelRunner:
        """The engine core's model runner (the only owner of the KV cache)."""
        return self.core.runner

    @runner.setter
    def runner(self, runner: ModelRunner) -> None:
        """Swap the core's runner (for instance one with native=False, to force the PyTorch forward); its cache must
        have the core's geometry. Only between calls: no request may be running."""
        pool = self.core.pool
        if (runner.cache.num_blocks, runner.cache.block_size) != (pool.num_blocks, pool.block_size):
            raise ConfigError(
                f"the runner's KV cache has {runner.cache.num_blocks} blocks of {runner.cache.block_size} positions; "
                f"the engine core's has {pool.num_blocks} of {pool.block_size}"
            )
        if self.core.has_work:
            raise CapacityError("requests are running: swap the runner between calls")
        self.core.runner = runner

    @property
    def stop_tokens(self) -> set[int]:
        """Token ids that end a sequence: the tokenizer's, plus the end-of-turn tokens of the chat template."""
        return set(self.tokenizer.stop_tokens) | set(getattr(self.formatter, "stop_tokens", ()))

    def new_request(
        self, prompt: list[int], params: SamplingParams, *, max_tokens: int | None = None, request_id=None
    ) -> Request:
        """A request for the engine core with this model's stop tokens (none with `params.ignore_eos`)."""
        if request_id is None:
            self._ids += 1
            request_id = f"llama-{id(self):x}-{self._ids}"
        eos = frozenset() if params.ignore_eos else frozenset(self.stop_tokens)
        return Request(request_id, list(prompt), params, max_tokens=max_tokens, stop_ids=eos)

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
        """Load a Meta checkpoint (`params.json` + `consolidated.*.pth`, any number of shards) and a Llama 3
        `tokenizer.model`, with Meta's signature. device: CUDA when available, else CPU; dtype: bfloat16 on CUDA,
        float32 on CPU. `model_parallel_size` > 1 (None: the launch's WORLD_SIZE, as Meta's) runs the model across
        that many processes started by torchrun, tensor-parallel (lamina.parallel: gloo on CPU, NCCL on CUDA), each
        rank holding its share of the weights and heads; every rank returns the same results, as the reference does.
        The KV cache is Meta's: a row of max_seq_len positions for each of max_batch_size sequences."""
        check_seed(seed, ConfigError)
        device = resolve_device(device)
        try:
            tp, device = parallel.setup(model_parallel_size, device)
        except ConfigError as e:
            raise ConfigError(f"model_parallel_size={model_parallel_size}: {e}") from None
        config = EngineConfig(max_seq_len, max_batch_size, device, resolve_dtype(dtype, device))
        if not Path(ckpt_dir).is_dir():  # say so before the tokenizer is checked, and the weights read
            raise WeightsError(f"checkpoint directory not found: {ckpt_dir}")
        tokenizer = Llama3Tokenizer(tokenizer_path)
        select = None
        if tp is not None:  # every rank loads the same checkpoint, and reads only its part of each weight
            parallel.agree(tp, "the model", (str(Path(ckpt_dir).resolve()), str(config.dtype)))
            select = functools.partial(parallel.span, tp=tp)
        model_config, state_dict = load_meta_checkpoint(ckpt_dir, select)
        local = model_config
        if tp is not None:
            parallel.agree(tp, "the model's configuration", model_config)
            local = parallel.build_config(model_config, tp)
        model = build_transformer(local, state_dict, device=config.device, dtype=config.dtype)
        if tp is not None:
            parallel.parallelize(model, tp, model_config.vocab_size)
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
        structured_outputs: StructuredOutputs | dict | None = None,
    ) -> tuple[list[list[int]], list[list[float]] | None]:
        """Continue each prompt; returns (tokens, logprobs) as Meta's `generate` does.

        Each sequence stops at its first stop token (not returned) or after `max_gen_len` new tokens (None: until
        its context of `max_seq_len` is full). temperature 0 is greedy. logprobs are log-softmax of the raw logits.
        With echo, the prompt comes first, with its teacher-forced logprobs (0.0 for the first token). A seed gives
        every prompt a generator seeded with it (as the server's `seed` does). `structured_outputs` constrains every
        sequence's new tokens (lamina.engine.sampling.StructuredOutputs: JSON Schema, regex, choice, grammar); a
        sequence whose constraint is complete stops there."""
        results = self.complete(
            prompt_tokens,
            max_gen_len,
            temperature,
            top_p,
            logprobs,
            echo,
            seed=seed,
            structured_outputs=structured_outputs,
        )
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
        structured_outputs: StructuredOutputs | dict | None = None,
    ) -> list[Completion]:
        """`generate` returning a `Completion` per prompt (with its finish reason). With `ignore_eos`, stop tokens
        are generated like any other and every sequence runs to its length limit (for benchmarks)."""
        call = self._call(
            prompt_tokens, max_gen_len, temperature, top_p, seed, ignore_eos, logprobs, structured_outputs
        )
        B = len(call.prompts)
        out: list[list[int]] = [[] for _ in range(B)]
        out_lp: list[list[float]] = [[] for _ in range(B)]
        prompt_lp: list[list[float] | None] = [None] * B
        finish = ["length"] * B
        unmet = [False] * B
        for i, o in self._outputs(call, score=logprobs and echo):
            if o.prompt_logprobs is not None:
                prompt_lp[i] = [0.0] + [lp for lp, _ in o.prompt_logprobs[1:]]
            if o.token is not None:
                out[i].append(o.token)
                if logprobs:
                    out_lp[i].append(o.logprob)
            if o.finish_reason is not None:
                finish[i], unmet[i] = o.finish_reason, o.constraint_unmet
        return [
            Completion(p, out[i], out_lp[i] if logprobs else None, prompt_lp[i], finish[i], unmet[i])
            for i, p in enumerate(call.prompts)
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
        structured_outputs: StructuredOutputs | dict | None = None,
    ) -> Iterator[StreamDelta]:
        """Generate as `generate` does, yielding a `StreamDelta` for each sequence's every new token as it is made.

        `delta.text` is the text that became final with that token: it is empty while a character is still split
        across tokens, so the pieces never hold broken UTF-8; their concatenation is the sequence's whole text.
        Each sequence's last delta carries its `finish_reason`. The request is checked before this returns."""
        call = self._call(
            prompt_tokens, max_gen_len, temperature, top_p, seed, ignore_eos, logprobs, structured_outputs
        )
        return (
            StreamDelta(i, o.text, o.token, o.logprob, o.finish_reason) for i, o in self._outputs(call, score=False)
        )

    def _outputs(self, call: _Call, score: bool) -> Iterator[tuple[int, RequestOutput]]:
        """Add the call's prompts to the engine core as requests and step it until they finish, yielding (prompt
        index, output) as they come. A prompt allowed no new tokens gets a single output with finish reason "length"
        (without a request, unless its prompt is to be scored). Requests still running when the generator is closed
        are aborted. Other callers' requests advance in the same steps; their outputs go to their own sinks."""
        params = dataclasses.replace(call.params, prompt_logprobs=0) if score else call.params
        index: dict = {}
        requests = []
        for i, (prompt, budget) in enumerate(zip(call.prompts, call.budgets)):
            if budget == 0 and not score:
                yield i, RequestOutput(None, None, "", None, None, "length", len(prompt), 0)
                continue
            request = self.new_request(prompt, params, max_tokens=budget)
            index[request.request_id] = i
            requests.append(request)
        if not requests:
            return
        box: deque[RequestOutput] = deque()
        core = self.core
        with core.lock:
            free = self.config.max_batch_size - self._held
            if len(requests) > free:
                raise CapacityError(
                    f"{len(requests)} sequence(s) need a place in the batch but only {free} of "
                    f"{self.config.max_batch_size} are free: other generations on this model are still running "
                    "(finish or close them first)"
                )
            try:
                for request in requests:
                    request.sink = box.append
                    core.add(request)
            except BaseException:
                for request in requests:
                    core.abort(request.request_id)
                raise
            self._held += len(requests)
        running = set(index)
        try:
            while running:
                if not box:
                    with core.lock:
                        if not box:  # another thread may have stepped the core meanwhile
                            if not core.has_work:
                                raise RuntimeError("the engine core lost this call's requests")
                            try:
                                core.step()
                            except Exception as e:
                                core.fail(e)  # every caller's requests end with the error, not a hang
                                raise
                    continue
                out = box.popleft()
                if out.error is not None:
                    raise out.error
                if out.finish_reason is not None:
                    running.discard(out.request_id)
                    with core.lock:
                        self._held -= 1
                yield index[out.request_id], out
        finally:
            if running:
                with core.lock:
                    for request_id in running:
                        core.abort(request_id)
                    self._held -= len(running)

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
        structured_outputs: StructuredOutputs | dict | None = None,
    ) -> list[dict]:
        """Complete each text prompt: [{"generation": str, and with logprobs "tokens": [str], "logprobs": [float]}]."""
        if (
            not isinstance(prompts, Sequence)
            or isinstance(prompts, str)
            or not all(isinstance(p, str) for p in prompts)
        ):
            raise RequestError("prompts must be a list of strings")
        prompt_tokens = [self.tokenizer.encode(p, bos=self.tokenizer.add_bos, eos=False) for p in prompts]
        tokens, lps = self.generate(
            prompt_tokens,
            max_gen_len,
            temperature,
            top_p,
            logprobs,
            echo,
            seed=seed,
            structured_outputs=structured_outputs,
        )
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
        structured_outputs: StructuredOutputs | dict | None = None,
    ) -> list[dict]:
        """Reply to each dialog: [{"generation": {"role": "assistant", "content": str}, ...}]."""
        prompt_tokens = [self.encode_dialog(d) for d in self._check_dialogs(dialogs)]
        tokens, lps = self.generate(
            prompt_tokens, max_gen_len, temperature, top_p, logprobs, seed=seed, structured_outputs=structured_outputs
        )
        return [
            self._prediction({"role": "assistant", "content": self.tokenizer.decode(t)}, t, lp)
            for t, lp in zip(tokens, lps or [None] * len(tokens))
        ]

    def encode_dialog(self, dialog: Dialog, tools: Sequence[Tool] = ()) -> list[int]:
        """Prompt token ids for a dialog, through the model's chat template (or Llama 3's format), telling the
        model of `tools` (lamina.tokenizer.tools.check_tools) as its family expects."""
        if self.formatter is None:
            raise RequestError("this model has no chat template, and its vocabulary lacks Llama 3's chat tokens")
        return self.formatter.encode_dialog_prompt(dialog, tools)

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

    def _call(
        self, prompt_tokens, max_gen_len, temperature, top_p, seed, ignore_eos, logprobs, structured_outputs=None
    ) -> _Call:
        prompts = self._check_prompts(prompt_tokens)
        budgets = self._check_budgets(prompts, max_gen_len)
        temperature, top_p = _check_sampling(temperature, top_p)
        seed = None if seed is None else check_seed(seed, RequestError)
        params = SamplingParams(
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            logprobs=bool(logprobs),
            ignore_eos=bool(ignore_eos),
            structured_outputs=structured_outputs,
        )
        return _Call(prompts, budgets, params)

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


def check_seed(seed, error: type[Exception]) -> int:
    """`seed` as an int that seeds a torch.Generator (64 bits), or `error` naming it."""
    try:
        seed = _integer(seed)
    except TypeError:
        raise error(f"seed must be an integer, got {seed!r}") from None
    if not -(2**63) <= seed < 2**64:
        raise error(f"seed {seed} is out of range: it must fit in 64 bits")
    return seed


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
