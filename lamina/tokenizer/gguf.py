"""GGUF vocabularies: rebuilds the `tokenizer.ggml.*` metadata of a GGUF file as an `HFTokenizer` that splits and
merges text as llama.cpp does."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from lamina.errors import TokenizerError
from lamina.tokenizer.hf import HFTokenizer
from lamina.tokenizer.llama3 import PATTERN as LLAMA3_PATTERN

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "\u2581"  # SentencePiece's visible space
# Control-token names that llama.cpp treats as ending generation whatever the file's eos/eot ids say.
END_OF_GENERATION = frozenset(
    (
        "<|eot_id|>",
        "<|eom_id|>",
        "<|im_end|>",
        "<|end|>",
        "<end_of_turn>",
        "<|endoftext|>",
        "<|end_of_text|>",
        "<EOT>",
        "<|return|>",
        "<|call|>",
        "<end_of_utterance>",
    )
)

# Pre-tokenizer regexes. A vocabulary's regexes run one after another, each splitting the pieces the one before left
# (llama.cpp's llm_tokenizer_bpe). Where llama.cpp respells a regex for its own engine (`'[sS]` for `(?i:'s)`), this
# is the original from the model's tokenizer.json, which the `tokenizers` (Oniguruma) engine runs as written.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = LLAMA3_PATTERN
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class PreTokenizer:
    """How a byte-level BPE vocabulary cuts text before merging, and llama.cpp's other per-type settings."""

    regexes: tuple[str, ...]
    ignore_merges: bool = False  # a piece that is a whole token is that token, merges or not (tiktoken's rule)
    add_bos: bool = False  # whether BOS goes before a prompt when the file does not say


_LLAMA3_PRE = PreTokenizer((_LLAMA3,), ignore_merges=True, add_bos=True)
# tokenizer.ggml.pre names, grouped as llama.cpp's llama_vocab::load groups them.
PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0"), _LLAMA3_PRE),
    **dict.fromkeys(("dbrx", "smaug-bpe"), PreTokenizer((_LLAMA3,))),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell"), PreTokenizer((r"\p{N}", _GPT2))),
    # "gpt2" is not a llama.cpp name (it writes "gpt-2"); accepted for files written by other tools.
    **dict.fromkeys(("gpt-2", "gpt2", "phi-2", "mpt", "olmo"), PreTokenizer((_GPT2,))),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "stablelm2", "megrez"), PreTokenizer((_QWEN2,))),
    "tekken": PreTokenizer((_TEKKEN,), ignore_merges=True, add_bos=True),
    **dict.fromkeys(("gpt-4o", "llama4"), PreTokenizer((_GPT4O,))),
    # llama.cpp's fallback for files without a pre-tokenizer type.
    "default": PreTokenizer((r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]")),
}


def tokenizer_from_gguf(fields: Mapping[str, Any]) -> HFTokenizer:
    """The tokenizer a GGUF file's metadata describes (`fields`: key -> value, e.g.
    `lamina.weights.gguf_file.read_gguf_file(path).metadata`).

    Supports `tokenizer.ggml.model` "gpt2" (byte-level BPE, text split by the `tokenizer.ggml.pre` regexes) and
    "llama" (SentencePiece BPE with byte fallback). Control and unknown-type tokens become special tokens (parsed from
    text only with allowed_special="all"), user-defined ones plain added tokens (always parsed). Stop tokens are EOS
    and, when the file names them, the end-of-turn and end-of-message tokens, plus the control tokens llama.cpp
    recognises by name as ending generation (`END_OF_GENERATION`).
    """
    kind = fields.get("tokenizer.ggml.model")
    if kind is None:
        raise TokenizerError("GGUF metadata has no tokenizer.ggml.model; the file carries no vocabulary")
    tokens = _string_list(fields, "tokenizer.ggml.tokens")
    n = len(tokens)
    types = fields.get("tokenizer.ggml.token_type")
    if types is None:
        types = [NORMAL] * n
    elif not isinstance(types, Sequence) or len(types) < n:
        raise TokenizerError(f"tokenizer.ggml.token_type has {_length(types)} entries; expected one per token ({n})")
    # llama.cpp's defaults, for files that leave the special tokens out.
    default_bos, default_eos, default_unk = (1, 2, 0) if kind == "llama" else (None, None, None)
    bos_id = _token_id(fields, "tokenizer.ggml.bos_token_id", n, default_bos)
    eos_id = _token_id(fields, "tokenizer.ggml.eos_token_id", n, default_eos)
    stops = [_token_id(fields, f"tokenizer.ggml.{key}_token_id", n) for key in ("eot", "eom")]
    # Like llama.cpp, also end generation on control tokens whose name marks an end of turn or of text.
    stops += [i for i, (t, k) in enumerate(zip(tokens, types)) if k == CONTROL and t in END_OF_GENERATION]

    if kind == "gpt2":
        pre = _pre_tokenizer(fields)
        tokenizer, default_add_bos = _byte_level_bpe(fields, tokens, pre), pre.add_bos
        make: Callable[..., HFTokenizer] = HFTokenizer
    elif kind == "llama":
        unk_id = _token_id(fields, "tokenizer.ggml.unknown_token_id", n, default_unk)
        space_prefix = bool(fields.get("tokenizer.ggml.add_space_prefix", True))
        tokenizer, default_add_bos = _sentencepiece_bpe(fields, tokens, types, unk_id, space_prefix), True
        space_led = [space_prefix and k != BYTE and t.startswith(SPACE) for t, k in zip(tokens, types)]
        make = partial(SentencePieceTokenizer, pieces=_piece_bytes(tokens, types), space_led=space_led)
    else:
        raise TokenizerError(
            f"GGUF tokenizer model {kind!r} (tokenizer.ggml.model) is not supported; expected 'gpt2' (byte-level "
            "BPE) or 'llama' (SentencePiece)"
        )
    _add_special_tokens(tokenizer, tokens, types)
    add_bos = fields.get("tokenizer.ggml.add_bos_token", default_add_bos)
    if add_bos and bos_id is None:
        raise TokenizerError("tokenizer.ggml.add_bos_token is true, but the file has no tokenizer.ggml.bos_token_id")
    return make(
        tokenizer,
        bos_id=bos_id,
        eos_id=eos_id,
        add_bos=bool(add_bos),
        stop_tokens=[t for t in stops if t is not None],
        add_eos=bool(fields.get("tokenizer.ggml.add_eos_token", False)) and eos_id is not None,
    )


class SentencePieceTokenizer(HFTokenizer):
    """An HFTokenizer for a SentencePiece vocabulary that decodes as sentencepiece does: a byte token is its byte,
    and each byte that is not part of valid UTF-8 becomes one U+FFFD. (tokenizers' ByteFallback decoder turns a whole
    run of byte tokens into U+FFFDs when one of them is invalid, so a longer sequence could change text already
    streamed.) Special tokens decode to their names; the "▁" that starts the first token is the added space prefix
    and is dropped."""

    def __init__(self, tokenizer: Tokenizer, *, pieces: Sequence[bytes], space_led: Sequence[bool], **kwargs: Any):
        super().__init__(tokenizer, **kwargs)
        self._pieces = list(pieces)
        self._space_led = list(space_led)  # ids whose leading "▁" is the space prefix when they come first

    def decode(self, ids: Sequence[int]) -> str:
        """Text of the ids, special tokens included; each byte that does not form UTF-8 becomes U+FFFD."""
        ids = self._checked_ids(ids)
        raw = b"".join(self._pieces[i] for i in ids)
        if ids and self._space_led[ids[0]]:
            raw = raw[1:]
        # surrogateescape stands each bad byte for one lone surrogate; no real text has those.
        return _LONE_SURROGATE.sub(_REPLACEMENT, raw.decode("utf-8", "surrogateescape"))


_LONE_SURROGATE = re.compile("[\udc80-\udcff]")
_REPLACEMENT = "\ufffd"
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _piece_bytes(tokens: list[str], types: Sequence[int]) -> list[bytes]:
    """What each SentencePiece token stands for in the text, as bytes."""
    pieces = []
    for token, kind in zip(tokens, types):
        byte = _BYTE_TOKEN.fullmatch(token) if kind == BYTE else None
        pieces.append(bytes([int(byte.group(1), 16)]) if byte else token.replace(SPACE, " ").encode("utf-8"))
    return pieces


def _byte_level_bpe(fields: Mapping[str, Any], tokens: list[str], pre: PreTokenizer) -> Tokenizer:
    """GPT-2 style BPE over the bytes of the text; tokens and merges are spelled in GPT-2's byte alphabet."""
    merges = [_split_merge(m) for m in _string_list(fields, "tokenizer.ggml.merges")]
    tokenizer = Tokenizer(_bpe(tokens, merges, ignore_merges=pre.ignore_merges))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(regex), behavior="isolated") for regex in pre.regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _sentencepiece_bpe(
    fields: Mapping[str, Any], tokens: list[str], types: Sequence[int], unk_id: int | None, space_prefix: bool
) -> Tokenizer:
    """SentencePiece BPE as llama.cpp runs it: spaces become "▁" (and one goes before the text, and after each
    special token, when add_space_prefix), then adjacent pieces merge, highest score first; characters without a
    piece become <0xXX> byte tokens."""
    scores = fields.get("tokenizer.ggml.scores")
    if not isinstance(scores, Sequence) or len(scores) < len(tokens):
        raise TokenizerError(
            f"tokenizer.ggml.scores has {_length(scores)} entries; a SentencePiece vocabulary needs one per token "
            f"({len(tokens)})"
        )
    unk = tokens[unk_id] if unk_id is not None else None
    tokenizer = Tokenizer(_bpe(tokens, _merges_by_score(tokens, types, scores), unk_token=unk, byte_fallback=True))
    # Normalizing, unlike a Metaspace pre-tokenizer, runs on each stretch of text between added tokens: that gives
    # llama.cpp's space after every special token, and keeps a leading space as a second "▁".
    escape = normalizers.Replace(" ", SPACE)
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), escape]) if space_prefix else escape
    return tokenizer  # no decoder: SentencePieceTokenizer decodes


def _merges_by_score(tokens: list[str], types: Sequence[int], scores: Sequence[float]) -> list[tuple[str, str]]:
    """SentencePiece merges the adjacent pair whose concatenation is the best-scoring piece. As BPE merge rules:
    every split of every normal piece into two pieces, best score first (ties: lower id first)."""
    symbols = {t: i for i, t in enumerate(tokens) if types[i] in (NORMAL, USER_DEFINED)}
    rules = []
    for piece, i in symbols.items():
        if types[i] != NORMAL:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in symbols and right in symbols:
                rules.append((-scores[i], i, symbols[left], left, right))
    rules.sort()
    return [(left, right) for *_, left, right in rules]


def _bpe(tokens: list[str], merges: list[tuple[str, str]], **options: Any) -> models.BPE:
    vocab: dict[str, int] = {}
    for i, token in enumerate(tokens):
        token = token or f"[EMPTY_{i}]"  # llama.cpp's name for an empty token
        if vocab.setdefault(token, i) != i:
            raise TokenizerError(f"GGUF vocabulary lists {token!r} twice (ids {vocab[token]} and {i})")
    try:
        return models.BPE(vocab=vocab, merges=merges, **options)
    except Exception as e:  # noqa: BLE001 (the Rust side raises plain Exception, e.g. for a merge of unknown tokens)
        raise TokenizerError(f"cannot build a BPE model from the GGUF vocabulary: {e}") from None


def _add_special_tokens(tokenizer: Tokenizer, tokens: list[str], types: Sequence[int]) -> None:
    """Control and unknown-type tokens become special added tokens, user-defined ones plain added tokens: llama.cpp
    matches both whole in the text (the first kind only when asked to parse special tokens)."""
    special = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k in (UNKNOWN, CONTROL)]
    plain = [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == USER_DEFINED]
    tokenizer.add_special_tokens([t for t in special if t.content])
    tokenizer.add_tokens([t for t in plain if t.content])
    if tokenizer.get_vocab_size(with_added_tokens=True) != len(tokens):
        raise TokenizerError("GGUF added tokens did not map onto their vocabulary ids")


def _pre_tokenizer(fields: Mapping[str, Any]) -> PreTokenizer:
    name = fields.get("tokenizer.ggml.pre") or "default"  # llama.cpp's choice when the file names none
    if name not in PRE_TOKENIZERS:
        raise TokenizerError(
            f"GGUF pre-tokenizer type {name!r} (tokenizer.ggml.pre) is not supported; supported: "
            f"{', '.join(sorted(PRE_TOKENIZERS))}"
        )
    return PRE_TOKENIZERS[name]


def _split_merge(merge: str) -> tuple[str, str]:
    cut = merge.find(" ", 1)  # from 1: a token may be a lone space in odd vocabularies, never empty
    if cut < 0:
        raise TokenizerError(f"GGUF merge {merge!r} is not two tokens separated by a space")
    return merge[:cut], merge[cut + 1 :]


def _string_list(fields: Mapping[str, Any], key: str) -> list[str]:
    value = fields.get(key)
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        what = "missing" if value is None else f"a {type(value).__name__}"
        raise TokenizerError(f"{key} is {what}; expected a list of strings")
    return list(value)


def _token_id(fields: Mapping[str, Any], key: str, n: int, default: int | None = None) -> int | None:
    value = fields.get(key, default)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < n:
        raise TokenizerError(f"{key} is {value!r}; expected a token id in [0, {n})")
    return value


def _length(value: object) -> int | str:
    return len(value) if isinstance(value, Sequence) else "no"
