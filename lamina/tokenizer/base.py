"""The Tokenizer protocol every tokenizer kind implements (Llama 3 tiktoken, Hugging Face tokenizer.json, GGUF)."""

from __future__ import annotations

from typing import AbstractSet, Literal, Protocol, Sequence, runtime_checkable


@runtime_checkable
class Tokenizer(Protocol):
    """What the engine needs from a tokenizer.

    - `encode(s, bos=..., eos=...)` adds the BOS/EOS ids when asked (and when the vocabulary has them). Text that looks
      like a special token is ordinary text unless `allowed_special="all"`, which chat templates use.
    - `decode(ids)` returns text; bytes that do not form UTF-8 become U+FFFD (streaming uses `StreamDecoder`).
    - `add_bos` says whether the model expects BOS before a plain text prompt.
    - `stop_tokens` end generation; `special_tokens` maps control-token names to ids; `n_words` counts all ids.
    """

    bos_id: int | None
    eos_id: int | None
    add_bos: bool
    stop_tokens: list[int]
    special_tokens: dict[str, int]
    n_words: int

    def encode(
        self, s: str, *, bos: bool, eos: bool, allowed_special: Literal["all"] | AbstractSet[str] | None = None
    ) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


def tokenizer_difference(a: Tokenizer, b: Tokenizer) -> str | None:
    """How two tokenizers differ (the first difference found), or None when they map every id to the same text and
    agree on BOS, EOS, the stop tokens and the special tokens: two models that share a tokenizer can verify each
    other's tokens (speculative decoding's draft and target)."""
    if a.n_words != b.n_words:
        return f"{a.n_words} tokens against {b.n_words}"
    for name in ("bos_id", "eos_id"):
        if getattr(a, name) != getattr(b, name):
            return f"{name} {getattr(a, name)} against {getattr(b, name)}"
    if sorted(a.stop_tokens) != sorted(b.stop_tokens):
        return f"stop tokens {sorted(a.stop_tokens)} against {sorted(b.stop_tokens)}"
    if a.special_tokens != b.special_tokens:
        differ = sorted(set(a.special_tokens.items()) ^ set(b.special_tokens.items()))
        return f"special tokens differ ({differ[0][0]!r} first)"
    for i in range(a.n_words):
        if a.decode([i]) != b.decode([i]):
            return f"token {i} is {a.decode([i])!r} against {b.decode([i])!r}"
    return None
