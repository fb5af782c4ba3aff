"""Hugging Face tokenizers: a `tokenizers.Tokenizer` (from tokenizer.json, or rebuilt from a GGUF vocabulary) behind
the lamina `Tokenizer` protocol."""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Any, Literal

import tokenizers
from tokenizers import AddedToken

from lamina.errors import RequestError, TokenizerError

# tokenizer_config.json keys whose values transformers registers as special tokens (so text spelling one of them is
# parsed as that token), besides those in added_tokens_decoder.
_NAMED_SPECIALS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")
_SPECIAL_LISTS = ("additional_special_tokens", "extra_special_tokens")
# Text the post-processor probe encodes, to see which ids the post-processor puts around a plain sequence.
_PROBE = "Hello world"


class HFTokenizer:
    """Encodes and decodes with a `tokenizers.Tokenizer`; ids equal those of transformers' `AutoTokenizer`.

    The tokenizer.json post-processor is never run: `encode` adds BOS/EOS itself, as `bos=`/`eos=` ask, and `add_bos`
    says whether the vocabulary's own setup would add BOS to a plain prompt. The wrapped `tokenizers.Tokenizer` is
    owned by this object from then on (its truncation and padding are switched off).
    """

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        *,
        bos_id: int | None,
        eos_id: int | None,
        add_bos: bool,
        stop_tokens: Sequence[int] | None = None,
        add_eos: bool = False,
    ):
        if not isinstance(tokenizer, tokenizers.Tokenizer):
            raise TypeError(f"HFTokenizer wraps a tokenizers.Tokenizer, not {type(tokenizer).__name__}")
        self._tokenizer = tokenizer
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        # encode() flips the shared `encode_special_tokens` flag for one call; the lock keeps threads from seeing
        # each other's setting.
        self._lock = threading.Lock()
        self.n_words: int = tokenizer.get_vocab_size(with_added_tokens=True)
        for name, value in (("bos_id", bos_id), ("eos_id", eos_id)):
            if value is not None:
                self._check_id(value, name)
        if add_bos and bos_id is None:
            raise TokenizerError("add_bos is True but the vocabulary has no BOS token")
        self.bos_id: int | None = bos_id
        self.eos_id: int | None = eos_id
        self.add_bos: bool = bool(add_bos)
        self.add_eos: bool = bool(add_eos)
        stops = [eos_id] if eos_id is not None else []
        for token in stop_tokens or ():
            self._check_id(token, "stop token")
            stops.append(int(token))
        self.stop_tokens: list[int] = list(dict.fromkeys(stops))
        self.special_tokens: dict[str, int] = {
            added.content: index
            for index, added in sorted(tokenizer.get_added_tokens_decoder().items())
            if added.special
        }

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The wrapped `tokenizers.Tokenizer` (read it; changing it changes this tokenizer)."""
        return self._tokenizer

    @classmethod
    def from_dir(cls, path: str | Path) -> HFTokenizer:
        """Load `tokenizer.json` with `tokenizer_config.json` and `generation_config.json` (both optional) from a
        folder, as transformers' `AutoTokenizer.from_pretrained(path)` would read them.

        BOS/EOS come from the config's `bos_token`/`eos_token`. `add_bos` says whether tokenizer.json's
        post-processor puts BOS before a sequence; the config's `add_bos_token` counts only when tokenizer.json has
        no post-processor (transformers v5 ignores it when there is a tokenizer.json at all). Every id in
        generation_config's `eos_token_id` (an int or a list) is a stop token.
        """
        folder = Path(path)
        if not folder.is_dir():
            raise TokenizerError(f"tokenizer folder not found: {folder} (expected a folder with tokenizer.json)")
        file = folder / "tokenizer.json"
        if not file.is_file():
            raise TokenizerError(f"no tokenizer.json in {folder}; expected a Hugging Face tokenizer folder")
        try:
            tokenizer = tokenizers.Tokenizer.from_file(str(file))
        except Exception as e:  # noqa: BLE001 (the Rust side raises plain Exception for bad JSON)
            raise TokenizerError(f"cannot read {file}: {e}") from None
        config = _read_json(folder / "tokenizer_config.json")
        generation = _read_json(folder / "generation_config.json")

        _add_config_tokens(tokenizer, config, folder)
        bos_id = _config_token_id(tokenizer, config, "bos_token", folder)
        eos_id = _config_token_id(tokenizer, config, "eos_token", folder)

        prefix, suffix = _post_processor_ids(tokenizer)
        if len(prefix) > 1:
            raise TokenizerError(
                f"{file}'s post-processor puts ids {prefix} before a sequence; only a single BOS token is supported"
            )
        if tokenizer.post_processor is not None:
            # transformers (v5) lets tokenizer.json's post-processor decide and ignores the config's add_*_token;
            # the token it adds is the BOS a prompt gets.
            bos_id = prefix[0] if prefix else bos_id
            eos_id = suffix[0] if len(suffix) == 1 and eos_id is None else eos_id
            add_bos, add_eos = bool(prefix), bool(suffix) and suffix == [eos_id]
        else:
            add_bos, add_eos = bool(config.get("add_bos_token", False)), bool(config.get("add_eos_token", False))

        stops = generation.get("eos_token_id")
        stops = [] if stops is None else [stops] if isinstance(stops, int) else stops
        if not isinstance(stops, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in stops):
            raise TokenizerError(
                f"eos_token_id in {folder / 'generation_config.json'} is {stops!r}; expected an int or a list of ints"
            )
        return cls(
            tokenizer,
            bos_id=bos_id,
            eos_id=eos_id,
            add_bos=add_bos and bos_id is not None,
            stop_tokens=stops,
            add_eos=add_eos and eos_id is not None,
        )

    def encode(
        self, s: str, *, bos: bool, eos: bool, allowed_special: Literal["all"] | AbstractSet[str] | None = None
    ) -> list[int]:
        """Token ids of `s`, with BOS/EOS added as asked (when the vocabulary has them).

        Special tokens spelled in `s` are ordinary text unless `allowed_special="all"`, which parses every one of
        them (added tokens that are not special are always parsed, as in transformers). Allowing only some of them
        is not supported: pass "all", or None / an empty set.
        """
        if not isinstance(s, str):
            raise TypeError(f"encode() takes a str, not {type(s).__name__}")
        parse_special = self._parse_special(allowed_special)
        with self._lock:
            previous = self._tokenizer.encode_special_tokens
            self._tokenizer.encode_special_tokens = not parse_special
            try:
                ids = self._tokenizer.encode(s, add_special_tokens=False).ids
            finally:
                self._tokenizer.encode_special_tokens = previous
        if bos and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        if eos and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of the ids, special tokens included; bytes that do not form UTF-8 become U+FFFD."""
        return self._tokenizer.decode(self._checked_ids(ids), skip_special_tokens=False)

    def _checked_ids(self, ids: Sequence[int]) -> list[int]:
        ids = [int(i) for i in ids]
        for i in ids:
            if not 0 <= i < self.n_words:
                raise RequestError(f"token id {i} is out of range; the vocabulary has {self.n_words} ids")
        return ids

    def _parse_special(self, allowed_special: object) -> bool:
        if allowed_special == "all":
            return True
        if allowed_special is None or (isinstance(allowed_special, AbstractSet) and not allowed_special):
            return False
        if isinstance(allowed_special, AbstractSet) and all(isinstance(name, str) for name in allowed_special):
            if set(self.special_tokens) <= allowed_special:
                return True
            raise TokenizerError(
                f"allowed_special={sorted(allowed_special)[:4]}...: allowing only some special tokens is not "
                f"supported by Hugging Face tokenizers; pass 'all' or None"
            )
        raise TokenizerError(f"allowed_special is {allowed_special!r}; expected 'all', None or a set of token names")

    def _check_id(self, value: object, what: str) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < self.n_words:
            raise TokenizerError(f"{what} is {value!r}; expected a token id in [0, {self.n_words})")


def _read_json(file: Path) -> dict[str, Any]:
    """The object in a JSON file, or {} when there is no such file."""
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"cannot read {file}: {e}") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{file} holds a {type(data).__name__}; expected a JSON object")
    return data


def read_tokenizer_config(folder: str | Path) -> dict[str, Any]:
    """A Hugging Face folder's tokenizer_config.json as a dict ({} when it has none)."""
    return _read_json(Path(folder) / "tokenizer_config.json")


def special_token_strings(config: dict[str, Any]) -> dict[str, str]:
    """bos_token, eos_token, unk_token and pad_token of a tokenizer_config.json, as chat templates see them."""
    names = ("bos_token", "eos_token", "unk_token", "pad_token")
    return {name: text for name in names if (text := _token_content(config.get(name))) is not None}


def _token_content(value: object) -> str | None:
    """A token as tokenizer_config.json writes it: a string, or a dict with "content"."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _add_config_tokens(tokenizer: tokenizers.Tokenizer, config: dict[str, Any], folder: Path) -> None:
    """Make the tokens tokenizer_config.json declares known to the tokenizer, as transformers does on loading:
    added_tokens_decoder entries with their flags, and the named special tokens as special tokens."""
    added = tokenizer.get_added_tokens_decoder()
    known = {token.content for token in added.values()}
    for key, entry in sorted((config.get("added_tokens_decoder") or {}).items(), key=lambda kv: int(kv[0])):
        content = _token_content(entry)
        if content is None or content in known:
            continue
        flags = {k: bool(entry[k]) for k in ("single_word", "lstrip", "rstrip", "normalized") if k in entry}
        token = AddedToken(content, special=bool(entry.get("special", False)), **flags)
        if token.special:
            tokenizer.add_special_tokens([token])
        else:
            tokenizer.add_tokens([token])
        if tokenizer.token_to_id(content) != int(key):
            raise TokenizerError(
                f"{folder / 'tokenizer_config.json'} gives {content!r} id {key}, but tokenizer.json gives it "
                f"{tokenizer.token_to_id(content)}"
            )
        known.add(content)
    named = [_token_content(config.get(key)) for key in _NAMED_SPECIALS]
    for key in _SPECIAL_LISTS:
        values = config.get(key) or []
        named += [_token_content(v) for v in (values.values() if isinstance(values, dict) else values)]
    for content in named:
        if content is not None and content not in known and tokenizer.token_to_id(content) is not None:
            tokenizer.add_special_tokens([AddedToken(content, special=True, normalized=False)])
            known.add(content)


def _config_token_id(tokenizer: tokenizers.Tokenizer, config: dict[str, Any], key: str, folder: Path) -> int | None:
    content = _token_content(config.get(key))
    if content is None:
        return None
    token_id = tokenizer.token_to_id(content)
    if token_id is None:
        raise TokenizerError(f"{key} {content!r} in {folder / 'tokenizer_config.json'} is not in the vocabulary")
    return token_id


def _post_processor_ids(tokenizer: tokenizers.Tokenizer) -> tuple[list[int], list[int]]:
    """The ids tokenizer.json's post-processor puts before and after a single sequence."""
    if tokenizer.post_processor is None:
        return [], []
    plain = tokenizer.encode(_PROBE, add_special_tokens=False).ids
    full = tokenizer.encode(_PROBE, add_special_tokens=True).ids
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start], full[start + len(plain) :]
    raise TokenizerError(f"the post-processor of this tokenizer.json rewrites the text's ids ({plain} -> {full})")
