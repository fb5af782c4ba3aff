"""StreamDecoder: pieces never split a character, concatenate to decode(all ids), and cost a bounded window each."""

from __future__ import annotations

import random

import pytest

from lamina.tokenizer.gguf import tokenizer_from_gguf
from lamina.weights.gguf_file import read_gguf_file
from lamina.tokenizer.llama3 import Llama3Tokenizer
from lamina.tokenizer.stream import StreamDecoder
from tests.tokenizer.test_gguf import SPECIAL_TEXTS, TEXTS, smollm_gguf

SPLIT_TEXTS = TEXTS + [
    "😀😀😀 🎉🎉 👍🏽👍🏽 👨‍👩‍👧‍👦",
    "中文文本测试，日本語のテキスト、한국어 텍스트 " * 3,
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝒎𝒂𝒕𝒉 𓀀𓀁𓀂 🀄🃏",
    "mixed: a😀b中c🎉d\u0301e",
]


@pytest.fixture(scope="module")
def smol():
    return tokenizer_from_gguf(read_gguf_file(smollm_gguf()).metadata)


@pytest.fixture(scope="module")
def llama3(tokenizer_path):
    return Llama3Tokenizer(tokenizer_path)


@pytest.fixture(scope="module")
def spm():
    """A tiny SentencePiece-style vocabulary: "▁" for spaces, a prefix space the decoder strips, byte fallback."""
    pieces = ["<unk>", "<s>", "</s>", *[f"<0x{b:02X}>" for b in range(256)], "▁", "▁a", "a", "b", "▁b", "ab", "▁ab"]
    kinds = [2, 3, 3, *[6] * 256, *[1] * 7]
    scores = [0.0] * 259 + [-1.0, -2.0, -3.0, -4.0, -5.0, -6.0, -7.0]
    return tokenizer_from_gguf(
        {
            "tokenizer.ggml.model": "llama",
            "tokenizer.ggml.tokens": pieces,
            "tokenizer.ggml.token_type": kinds,
            "tokenizer.ggml.scores": scores,
        }
    )


def stream(tokenizer, ids):
    decoder = StreamDecoder(tokenizer)
    pieces = [decoder.add(i) for i in ids]
    return pieces, decoder.flush()


def check(tokenizer, ids):
    pieces, rest = stream(tokenizer, ids)
    full = tokenizer.decode(ids)
    assert "".join(pieces) + rest == full, ids
    if "\ufffd" not in full:
        assert not any("\ufffd" in piece for piece in pieces + [rest])
    return pieces


@pytest.mark.parametrize("name", ["smol", "llama3"])
def test_texts_stream_to_their_decode(name, request):
    tokenizer = request.getfixturevalue(name)
    held = 0
    for text in SPLIT_TEXTS + SPECIAL_TEXTS:
        ids = tokenizer.encode(text, bos=True, eos=True, allowed_special="all")
        pieces = check(tokenizer, ids)
        held += pieces.count("")
    assert held > 0  # some characters were split across tokens and held back


@pytest.mark.parametrize("name", ["smol", "llama3", "spm"])
def test_random_ids_stream_to_their_decode(name, request):
    tokenizer = request.getfixturevalue(name)
    rng = random.Random(0)
    for _ in range(300):
        check(tokenizer, [rng.randrange(tokenizer.n_words) for _ in range(rng.randint(1, 60))])
    for _ in range(300):  # the first ids: single bytes in all three vocabularies
        check(tokenizer, [rng.randrange(min(300, tokenizer.n_words)) for _ in range(rng.randint(1, 60))])


def test_each_piece_is_final_text(smol):
    """Every piece ends the text so far with a whole character: what decode() gives for the ids up to that point."""
    ids = smol.encode("a😀b中c🎉", bos=False, eos=False)
    decoder = StreamDecoder(smol)
    text = ""
    for n, token in enumerate(ids, 1):
        text += decoder.add(token)
        assert smol.decode(ids[:n]).startswith(text)
        assert not text.endswith("\ufffd")
    assert text == "a😀b中c🎉" and decoder.flush() == ""


def test_unfinished_character_comes_out_at_flush(llama3):
    ids = llama3.encode("ok 𓀀", bos=False, eos=False)  # a rare character: its bytes take several tokens
    cut = next(n for n in range(len(ids)) if llama3.decode(ids[:n]).endswith("\ufffd"))
    pieces, rest = stream(llama3, ids[:cut])
    assert "".join(pieces) == "ok" and rest.endswith("\ufffd")
    assert "".join(pieces) + rest == llama3.decode(ids[:cut])


def test_sentencepiece_spaces_and_byte_fallback(spm):
    """Windows that start with a "▁" token lose that space in decode; the stream still matches the whole text."""
    for text in ["a b ab", " b", "a 中 😀 b", "ab  ab"]:
        ids = spm.encode(text, bos=True, eos=False)
        check(spm, ids)
    assert spm.decode(spm.encode("a 中 b", bos=False, eos=False)) == "a 中 b"


class CountingTokenizer:
    """A tokenizer that records the longest id list it was asked to decode."""

    def __init__(self, inner):
        self.inner, self.longest = inner, 0

    def decode(self, ids):
        self.longest = max(self.longest, len(ids))
        return self.inner.decode(ids)


def test_window_stays_bounded(llama3):
    text = "Streaming a long text: 中文 😀 and more words. " * 200
    ids = llama3.encode(text, bos=False, eos=False)
    counting = CountingTokenizer(llama3)
    pieces, rest = stream(counting, ids)
    assert "".join(pieces) + rest == text
    assert len(ids) > 2000 and counting.longest <= 8


def test_invalid_bytes_do_not_hold_forever(llama3):
    """A run of tokens that never completes a character is let out after a bounded number of tokens."""
    lead = next(i for i in range(llama3.n_words) if llama3.decode_bytes([i]) == b"\xc3")  # starts a 2-byte character
    ids = llama3.encode("é", bos=False, eos=False) + [lead] * 100  # each lead byte is cut short by the next one
    counting = CountingTokenizer(llama3)
    decoder = StreamDecoder(counting)
    out = "".join(decoder.add(i) for i in ids)
    assert out.startswith("é\ufffd") and counting.longest <= 33
    assert out + decoder.flush() == llama3.decode(ids)
