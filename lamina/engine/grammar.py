"""Structured output through llguidance: a request's constraint (lamina.engine.sampling.StructuredOutputs) compiled
to a grammar once and cached, a matcher per request that follows its tokens, and each step's token masks (filled by
llguidance's executor, during the forward pass on an accelerator: lamina.engine.sampler).

Why llguidance: it takes every kind of constraint the API offers (JSON Schema, regex, choice, Lark and GBNF
grammars) in one compiler, computes a mask in tens of microseconds without a per-schema warm-up over the whole
vocabulary, releases the GIL while it does, and installs as one wheel with no dependencies (xgrammar, the other
library made for this, pulls in transformers and triton; it masks faster and compiles slower:
benchmarks/bench_grammar_engines.py). benchmarks/bench_structured.py measures what a constraint costs a stream.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Sequence

import llguidance
import torch

from lamina.engine.sampling import StructuredOutputs
from lamina.errors import RequestError
from lamina.tokenizer import HFTokenizer, Llama3Tokenizer, Tokenizer

# JSON as the models read and write it: one space after ':' and ',', no free whitespace (a small model given free
# whitespace can loop on newlines until max_tokens).
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
CACHED_GRAMMARS = 256  # compiled constraints kept (least recently used dropped first)


class Grammars:
    """llguidance for one engine core: the model's vocabulary as llguidance sees it (built on first use: about a
    second), compiled constraints cached by value, and the executor that fills a step's masks.

    `compile` may be called from any thread (the server compiles a request's constraint off the engine thread before
    submitting it); the rest is called by whoever steps the engine."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int):
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        # Where a grammar may end, llguidance allows its end-of-sequence tokens: the tokenizer's stop tokens. The
        # sampler hands that choice to each request's own stop tokens.
        self.eos = list(
            dict.fromkeys(tokenizer.stop_tokens or ([tokenizer.eos_id] if tokenizer.eos_id is not None else []))
        )
        self.eos_ids = torch.tensor(self.eos, dtype=torch.long)
        self._ll: llguidance.LLTokenizer | None = None
        self._compiled: OrderedDict[StructuredOutputs, llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()
        self._executor: llguidance.LLExecutor | None = None
        self._worker: ThreadPoolExecutor | None = None

    @property
    def ll_tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._ll is None:
                self._ll = _ll_tokenizer(self.tokenizer, self.vocab_size, self.eos)
            return self._ll

    def compile(self, spec: StructuredOutputs) -> llguidance.LLMatcher:
        """The compiled constraint, as a matcher in its start state (shared: copy before use). Raises RequestError
        naming the problem when the constraint does not compile."""
        with self._lock:
            if spec in self._compiled:
                self._compiled.move_to_end(spec)
                return self._compiled[spec]
        matcher = llguidance.LLMatcher(self.ll_tokenizer, grammar_text(spec), log_level=0)
        if matcher.is_error():
            raise RequestError(f"the {spec.kind} constraint does not compile: {_first_line(matcher.get_error())}")
        with self._lock:
            self._compiled[spec] = matcher
            while len(self._compiled) > CACHED_GRAMMARS:
                self._compiled.popitem(last=False)
        return matcher

    def matcher(self, spec: StructuredOutputs) -> llguidance.LLMatcher:
        """A new matcher for one request, in the constraint's start state."""
        return self.compile(spec).deep_copy()

    def fill(self, matchers: Sequence[llguidance.LLMatcher]) -> torch.Tensor:
        """The next-token masks of `matchers` as llguidance's bitmask [n, ceil(V / 32)] int32, row i for matcher
        i, computed in parallel on llguidance's threads (the GIL released)."""
        mask = torch.zeros(len(matchers), (self.vocab_size + 31) // 32, dtype=torch.int32)
        if self._executor is None:
            self._executor = llguidance.LLExecutor()
        self._executor.unsafe_compute_mask_ptr(
            [(m, i) for i, m in enumerate(matchers)], mask.data_ptr(), mask.shape[1] * 4, mask.shape[0]
        )
        return mask

    def start(self, matchers: Sequence[llguidance.LLMatcher]) -> Future:
        """`fill` on a worker thread, so that it overlaps whatever the caller does next (the forward pass)."""
        if self._worker is None:
            self._worker = ThreadPoolExecutor(1, thread_name_prefix="lamina-grammar")
        return self._worker.submit(self.fill, list(matchers))


def grammar_text(spec: StructuredOutputs) -> str:
    """The llguidance grammar of a constraint (not yet checked: the matcher built from it reports errors)."""
    kind = spec.kind
    try:
        if kind in ("json", "json_object"):
            return llguidance.LLMatcher.grammar_from_json_schema(json.dumps(spec.schema), overrides=JSON_OPTIONS)
        if kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(spec.regex)
        if kind == "choice":
            return llguidance.grammar_from("choice", json.dumps(list(spec.choice)))
        return llguidance.grammar_from("grammar", spec.grammar)  # Lark, or GBNF (converted to Lark)
    except ValueError as e:
        raise RequestError(f"the {kind} constraint does not compile: {_first_line(str(e))}") from None


def _ll_tokenizer(tokenizer: Tokenizer, vocab_size: int, eos: list[int]) -> llguidance.LLTokenizer:
    """The vocabulary as llguidance needs it: every token's bytes (special tokens marked) and the tokenizer itself,
    for the tiktoken (Llama 3) and Hugging Face (tokenizer.json, GGUF) kinds."""
    if not eos:
        raise RequestError("structured output needs an end-of-sequence token, and this tokenizer has none")
    if isinstance(tokenizer, Llama3Tokenizer):
        encoding = tokenizer.encoding
        return llguidance.LLTokenizer.from_tiktoken(
            encoder=encoding._mergeable_ranks,
            special_tokens=encoding._special_tokens,
            pattern=encoding._pat_str,
            eos_token=eos,
            n_vocab=vocab_size,
        )
    if isinstance(tokenizer, HFTokenizer):
        return llguidance.LLTokenizer(tokenizer.backend.to_str(), n_vocab=vocab_size, eos_token=eos)
    raise RequestError(f"structured output does not support the tokenizer {type(tokenizer).__name__}")


def _first_line(message: str) -> str:
    """llguidance's errors can carry a dump of the grammar after the first line; keep the message short."""
    lines = [line for line in message.strip().splitlines() if line.strip()]
    return " ".join(lines[:3])[:500] if lines else "unknown error"
