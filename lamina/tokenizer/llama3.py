"""The Llama 3 tokenizer: tiktoken BPE over Meta's `tokenizer.model`, with the 256 Llama 3 special tokens."""

from __future__ import annotations

import base64
import itertools
from pathlib import Path
from typing import AbstractSet, Collection, Iterator, Literal, Sequence

import tiktoken

from lamina.errors import TokenizerError

# Llama 3's pre-tokenizer: contractions, letter runs, 1-3 digit groups, punctuation runs, newlines, whitespace.
PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
NUM_SPECIAL_TOKENS = 256
_NAMED_SPECIALS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",  # end of message: the model wants a tool result before it continues
    "<|eot_id|>",  # end of turn
    "<|python_tag|>",
    "<|image|>",
)
# tiktoken's Rust core panics on very long inputs and is quadratic on very long runs of one character class, so
# encode() cuts text into pieces of at most _MAX_CHARS characters and runs of at most _MAX_RUN (Meta uses the same).
_MAX_CHARS = 400_000
_MAX_RUN = 25_000


def load_bpe_ranks(path: Path) -> dict[bytes, int]:
    """Read a tiktoken BPE file: one `base64(token) rank` pair per line."""
    try:
        text = path.read_text(encoding="ascii")
    except FileNotFoundError:
        raise TokenizerError(f"tokenizer file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TokenizerError(f"cannot read tokenizer file {path}: {e}") from None
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:
            raise TokenizerError(
                f"{path} is not a tiktoken BPE file (line {lineno} is not 'base64-token rank')"
            ) from None
    if not ranks:
        raise TokenizerError(f"tokenizer file {path} is empty")
    return ranks


class Llama3Tokenizer:
    """Encodes text to Llama 3 token ids and back; ids equal those of Meta's reference tokenizer."""

    def __init__(self, model_path: str | Path):
        path = Path(model_path)
        ranks = load_bpe_ranks(path)
        n_base = len(ranks)
        names = list(_NAMED_SPECIALS) + [
            f"<|reserved_special_token_{i}|>" for i in range(2, 2 + NUM_SPECIAL_TOKENS - len(_NAMED_SPECIALS))
        ]
        self.special_tokens: dict[str, int] = {name: n_base + i for i, name in enumerate(names)}
        self._encoding = tiktoken.Encoding(
            name=path.name, pat_str=PATTERN, mergeable_ranks=ranks, special_tokens=self.special_tokens
        )
        self.n_words: int = n_base + len(names)
        self.bos_id: int = self.special_tokens["<|begin_of_text|>"]
        self.eos_id: int = self.special_tokens["<|end_of_text|>"]
        self.eot_id: int = self.special_tokens["<|eot_id|>"]
        self.eom_id: int = self.special_tokens["<|eom_id|>"]
        self.python_tag_id: int = self.special_tokens["<|python_tag|>"]
        self.pad_id: int = self.special_tokens["<|finetune_right_pad_id|>"]
        self.stop_tokens: list[int] = [self.eos_id, self.eom_id, self.eot_id]
        self.add_bos = True

    @property
    def vocab_size(self) -> int:
        return self.n_words

    @property
    def encoding(self) -> tiktoken.Encoding:
        """The tiktoken encoding (ranks, pattern and special tokens) behind this tokenizer."""
        return self._encoding

    def encode(
        self,
        s: str,
        *,
        bos: bool,
        eos: bool,
        allowed_special: Literal["all"] | AbstractSet[str] | None = None,
        disallowed_special: Literal["all"] | Collection[str] = (),
    ) -> list[int]:
        """Token ids of `s`, with <|begin_of_text|>/<|end_of_text|> added as asked.

        By default text that looks like a special token is encoded as ordinary text; pass `allowed_special="all"`
        (or a set of names) to encode it as the special token, `disallowed_special` to make it an error.
        """
        if not isinstance(s, str):
            raise TypeError(f"encode() takes a str, not {type(s).__name__}")
        allowed = set() if allowed_special is None else allowed_special
        ids = [self.bos_id] if bos else []
        for piece in _pieces(s):
            ids.extend(self._encoding.encode(piece, allowed_special=allowed, disallowed_special=disallowed_special))
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of the ids; bytes that do not form valid UTF-8 become U+FFFD."""
        return self._encoding.decode(list(ids))

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """Raw bytes of the ids (for streaming, where a character may be split across tokens)."""
        return self._encoding.decode_bytes(list(ids))


def _pieces(s: str) -> Iterator[str]:
    """Cut s into chunks of at most _MAX_CHARS characters, each cut further so that no run of only-whitespace or
    only-non-whitespace characters is longer than _MAX_RUN."""
    for start in range(0, max(len(s), 1), _MAX_CHARS):
        chunk = s[start : start + _MAX_CHARS]
        if len(chunk) <= _MAX_RUN:
            yield chunk
            continue
        cut, pos = 0, 0
        for _, run in itertools.groupby(chunk, str.isspace):
            run_len = sum(1 for _ in run)
            for offset in range(_MAX_RUN, run_len, _MAX_RUN):
                yield chunk[cut : pos + offset]
                cut = pos + offset
            pos += run_len
        yield chunk[cut:]
