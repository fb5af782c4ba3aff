"""HFTokenizer.from_dir against transformers' AutoTokenizer on the same tokenizer.json / tokenizer_config.json."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest
import tokenizers

from lamina.errors import RequestError, TokenizerError
from lamina.tokenizer.base import Tokenizer as TokenizerProtocol
from lamina.tokenizer.gguf import tokenizer_from_gguf
from lamina.weights.gguf_file import read_gguf_file
from lamina.tokenizer.hf import HFTokenizer
from tests.tokenizer.test_gguf import (
    SPECIAL_TEXTS,
    TEXTS,
    load_transformers_tokenizer,
    random_texts,
    smollm_gguf,
    smollm_transformers_tokenizer,
)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """SmolLM2's tokenizer as transformers saves it: tokenizer.json, tokenizer_config.json, chat_template.jinja."""
    folder = tmp_path_factory.mktemp("smollm2-tokenizer")
    smollm_transformers_tokenizer().save_pretrained(folder)
    return folder


def variant(saved: Path, tmp_path: Path, config=None, tokenizer=None, generation=None) -> Path:
    """A copy of the saved folder with its JSON files changed by the given functions (or written, for generation)."""
    folder = tmp_path / "tok"
    shutil.copytree(saved, folder)
    for name, change in (("tokenizer_config.json", config), ("tokenizer.json", tokenizer)):
        if change is not None:
            data = json.loads((folder / name).read_text())
            change(data)
            (folder / name).write_text(json.dumps(data))
    if generation is not None:
        (folder / "generation_config.json").write_text(json.dumps(generation))
    return folder


def assert_same_ids(ours: HFTokenizer, reference, texts) -> None:
    for text in texts:
        assert ours.encode(text, bos=ours.add_bos, eos=False, allowed_special="all") == reference(text)["input_ids"]
        plain = reference(text, split_special_tokens=True)["input_ids"]
        assert ours.encode(text, bos=ours.add_bos, eos=False) == plain, text


def test_from_dir_matches_transformers(saved):
    ours = HFTokenizer.from_dir(saved)
    reference = load_transformers_tokenizer(str(saved))
    assert isinstance(ours, TokenizerProtocol)
    assert ours.add_bos is False
    assert (ours.bos_id, ours.eos_id) == (reference.bos_token_id, reference.eos_token_id) == (1, 2)
    assert ours.stop_tokens == [2]
    assert ours.n_words == len(reference)
    assert ours.special_tokens == {t.content: i for i, t in reference.added_tokens_decoder.items() if t.special}
    assert_same_ids(ours, reference, TEXTS + SPECIAL_TEXTS + random_texts(200, seed=10))
    for text in TEXTS + SPECIAL_TEXTS:
        ids = ours.encode(text, bos=True, eos=True, allowed_special="all")
        assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def test_from_dir_agrees_with_gguf(saved):
    """The two loaders give the same tokenizer for the same model."""
    from_dir = HFTokenizer.from_dir(saved)
    from_gguf = tokenizer_from_gguf(read_gguf_file(smollm_gguf()).metadata)
    for text in TEXTS + SPECIAL_TEXTS + random_texts(300, seed=11):
        for allowed in (None, "all"):
            assert from_dir.encode(text, bos=True, eos=True, allowed_special=allowed) == from_gguf.encode(
                text, bos=True, eos=True, allowed_special=allowed
            )
    assert (from_dir.bos_id, from_dir.eos_id, from_dir.add_bos) == (from_gguf.bos_id, from_gguf.eos_id, False)
    assert from_dir.special_tokens == from_gguf.special_tokens


def test_add_bos_token_in_config(saved, tmp_path):
    """With a post-processor in tokenizer.json, the config's add_bos_token does not count (transformers v5); the
    config's tokens may be AddedToken dicts with "content"."""
    transformers = pytest.importorskip("transformers")
    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("transformers 4 lets add_bos_token rewrite tokenizer.json's post-processor")

    def config(data):
        data["add_bos_token"] = True
        data["bos_token"] = {"__type": "AddedToken", "content": "<|im_start|>", "lstrip": False, "special": True}

    folder = variant(saved, tmp_path, config=config)
    ours, reference = HFTokenizer.from_dir(folder), load_transformers_tokenizer(str(folder))
    assert ours.add_bos is False and ours.bos_id == 1 == reference.bos_token_id
    assert_same_ids(ours, reference, TEXTS + SPECIAL_TEXTS)


def test_add_bos_token_without_post_processor(saved, tmp_path):
    """Without a post-processor, add_bos_token is all there is to go by (transformers v5 would add no BOS)."""
    folder = variant(
        saved,
        tmp_path,
        config=lambda data: data.update(add_bos_token=True),
        tokenizer=lambda data: data.update(post_processor=None),
    )
    ours = HFTokenizer.from_dir(folder)
    assert ours.add_bos is True and ours.bos_id == 1
    assert ours.encode("Hi", bos=ours.add_bos, eos=False)[0] == 1


def test_post_processor_that_adds_bos(saved, tmp_path):
    """Without add_bos_token in the config, BOS comes from the TemplateProcessing post-processor, and encode(...,
    bos=False) does not get it from there behind our back."""

    def tokenizer(data):
        data["post_processor"] = {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [1], "tokens": ["<|im_start|>"]}},
        }

    folder = variant(saved, tmp_path, tokenizer=tokenizer, config=lambda data: data.pop("bos_token"))
    ours, reference = HFTokenizer.from_dir(folder), load_transformers_tokenizer(str(folder))
    assert ours.add_bos is True and ours.bos_id == 1
    assert reference("Hi")["input_ids"][0] == 1
    assert_same_ids(ours, reference, TEXTS + SPECIAL_TEXTS)
    assert ours.encode("Hi", bos=False, eos=False) == reference("Hi", add_special_tokens=False)["input_ids"]


def test_generation_config_stop_tokens(saved, tmp_path):
    folder = variant(saved, tmp_path, generation={"eos_token_id": [2, 0, 2]})
    assert HFTokenizer.from_dir(folder).stop_tokens == [2, 0]
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 0}))
    assert HFTokenizer.from_dir(folder).stop_tokens == [2, 0]
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": "two"}))
    with pytest.raises(TokenizerError, match="eos_token_id"):
        HFTokenizer.from_dir(folder)


def test_added_tokens_from_config(saved, tmp_path):
    """added_tokens_decoder entries missing from tokenizer.json are added, with their flags, as transformers does."""

    def tokenizer(data):
        data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "<empty_output>"]

    folder = variant(saved, tmp_path, tokenizer=tokenizer)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"] = {"16": {"content": "<empty_output>", "special": True, "normalized": False}}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    ours, reference = HFTokenizer.from_dir(folder), load_transformers_tokenizer(str(folder))
    assert ours.special_tokens["<empty_output>"] == 16
    assert_same_ids(ours, reference, ["a<empty_output>b", *SPECIAL_TEXTS])


def test_encode_special_flag_is_restored(saved):
    ours = HFTokenizer.from_dir(saved)
    backend = ours._tokenizer
    text = "<|im_start|>user"
    assert ours.encode(text, bos=False, eos=False, allowed_special="all")[0] == 1
    assert ours.encode(text, bos=False, eos=False)[0] != 1
    assert backend.encode_special_tokens is False
    assert ours.encode(text, bos=False, eos=False, allowed_special=set(ours.special_tokens))[0] == 1
    with pytest.raises(TokenizerError, match="not supported"):
        ours.encode(text, bos=False, eos=False, allowed_special={"<|im_start|>"})
    with pytest.raises(TypeError):
        ours.encode(b"bytes", bos=False, eos=False)
    assert backend.encode_special_tokens is False


def test_encode_from_threads(saved):
    """Threads that parse special tokens and threads that do not never see each other's setting."""
    ours = HFTokenizer.from_dir(saved)
    text = SPECIAL_TEXTS[0]
    parsed = ours.encode(text, bos=False, eos=False, allowed_special="all")
    plain = ours.encode(text, bos=False, eos=False)
    wrong = []

    def run(allowed, expected):
        for _ in range(300):
            if ours.encode(text, bos=False, eos=False, allowed_special=allowed) != expected:
                wrong.append(allowed)

    threads = [threading.Thread(target=run, args=(a, e)) for a, e in [("all", parsed), (None, plain)] * 3]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong


def test_decode_rejects_unknown_ids(saved):
    ours = HFTokenizer.from_dir(saved)
    with pytest.raises(RequestError, match="49152"):
        ours.decode([5, 49152])
    with pytest.raises(RequestError, match="-1"):
        ours.decode([-1])


def test_from_dir_errors(saved, tmp_path):
    with pytest.raises(TokenizerError, match="not found"):
        HFTokenizer.from_dir(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        HFTokenizer.from_dir(tmp_path / "empty")
    broken = variant(saved, tmp_path)
    (broken / "tokenizer.json").write_text('{"model": 3}')
    with pytest.raises(TokenizerError, match="cannot read"):
        HFTokenizer.from_dir(broken)
    shutil.rmtree(broken)
    bad_config = variant(saved, tmp_path)
    (bad_config / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(TokenizerError, match="tokenizer_config.json"):
        HFTokenizer.from_dir(bad_config)
    (bad_config / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|no such token|>"}))
    with pytest.raises(TokenizerError, match="no such token"):
        HFTokenizer.from_dir(bad_config)


def test_plain_constructor_checks_ids(saved):
    backend = tokenizers.Tokenizer.from_file(str(saved / "tokenizer.json"))
    with pytest.raises(TokenizerError, match="bos_id is 10000000"):
        HFTokenizer(backend, bos_id=10_000_000, eos_id=2, add_bos=True, stop_tokens=[2])
    with pytest.raises(TokenizerError, match="add_bos"):
        HFTokenizer(backend, bos_id=None, eos_id=2, add_bos=True, stop_tokens=[])
    with pytest.raises(TypeError):
        HFTokenizer("tokenizer.json", bos_id=1, eos_id=2, add_bos=False, stop_tokens=[])
    tokenizer = HFTokenizer(backend, bos_id=1, eos_id=2, add_bos=False, stop_tokens=[0, 2])
    assert tokenizer.stop_tokens == [2, 0]
    assert tokenizer.encode("", bos=True, eos=True) == [1, 2]
