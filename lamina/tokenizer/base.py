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
