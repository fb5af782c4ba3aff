"""The Llama 3 tokenizer against Meta's reference tokenizer (llama-models) on the same tokenizer.model."""

import pytest

from lamina import Llama3Tokenizer, TokenizerError

TEXTS = [
    "",
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog. 1234567890 3.14159",
    "  leading and trailing spaces   ",
    "tabs\tand\nnewlines\r\n\n\nand  multiple   spaces",
    "naïve café — “quotes” ‘single’ … ✓ 🦙🦙 日本語のテキスト 한국어 العربية עברית",
    "def f(x):\n    return {'a': [1, 2, 3], \"b\": x ** 2}  # comment\n\n\tif x != 0: pass",
    "I'm we're they've it's you'll he'd I'M SHOUTING",
    "emoji zwj 👩‍👩‍👧 flags 🇫🇷 combining e\u0301",
    "<|begin_of_text|> looks special but is text <|eot_id|>",
    "a" * 3000,
    " " * 500 + "x",
    "1234567890" * 50,
]


@pytest.fixture(scope="module")
def tok(tokenizer_path):
    return Llama3Tokenizer(tokenizer_path)


@pytest.mark.parametrize("text", TEXTS)
def test_ids_equal_reference(tok, ref_tokenizer, text):
    for bos, eos in [(False, False), (True, False), (True, True)]:
        assert tok.encode(text, bos=bos, eos=eos) == ref_tokenizer.encode(text, bos=bos, eos=eos)


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text, bos=False, eos=False)) == text


def test_special_tokens_allowed(tok, ref_tokenizer):
    text = "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
    ours = tok.encode(text, bos=True, eos=False, allowed_special="all")
    assert ours == ref_tokenizer.encode(text, bos=True, eos=False, allowed_special="all")
    assert tok.eot_id in ours and tok.decode(ours) == "<|begin_of_text|>" + text
    with pytest.raises(ValueError):
        tok.encode(text, bos=False, eos=False, disallowed_special="all")


def test_long_runs_split_like_reference(tok, ref_tokenizer):
    # Runs past 25,000 characters of one class are cut; ids must still match the reference.
    text = "x" * 60_001 + " " * 30_000 + "word " * 10
    assert tok.encode(text, bos=False, eos=False) == ref_tokenizer.encode(text, bos=False, eos=False)


def test_special_ids_match_reference(tok, ref_tokenizer):
    for name in ("n_words", "bos_id", "eos_id", "eot_id", "eom_id", "pad_id", "python_tag_id"):
        assert getattr(tok, name) == getattr(ref_tokenizer, name), name
    assert tok.stop_tokens == ref_tokenizer.stop_tokens
    assert tok.special_tokens == ref_tokenizer.special_tokens


def test_missing_or_bad_file(tmp_path):
    with pytest.raises(TokenizerError, match="not found"):
        Llama3Tokenizer(tmp_path / "nope.model")
    bad = tmp_path / "bad.model"
    bad.write_text("this is not base64 rank\n")
    with pytest.raises(TokenizerError, match="not a tiktoken BPE file"):
        Llama3Tokenizer(bad)


def test_tokenizer_package_imports_no_torch():
    """The tokenizer layer must stay usable without torch (imports point down, never into the model)."""
    import ast
    from pathlib import Path

    import lamina.tokenizer

    for path in Path(lamina.tokenizer.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not {
            m for m in imported if m.split(".")[0] == "torch" or m.startswith(("lamina.model", "lamina.engine"))
        }, path
