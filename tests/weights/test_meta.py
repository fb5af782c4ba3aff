"""Loading Meta checkpoints: one shard, model-parallel shards made by Meta's own resharding code, and bad input."""

import json

import pytest
import torch
from llama_models.checkpoint import reshard_mp

from lamina import ConfigError, Llama, TokenizerError, WeightsError
from lamina.weights import load_meta_checkpoint

from ..conftest import TINY_PARAMS, save_meta_checkpoint


def test_single_shard_equals_reference_state(tiny_ckpt, reference):
    config, state = load_meta_checkpoint(tiny_ckpt)
    assert config.n_kv_heads == TINY_PARAMS["n_kv_heads"]
    assert set(state) == set(reference.state_dict())
    for name, t in reference.state_dict().items():
        assert torch.equal(state[name], t), name


@pytest.mark.parametrize("n_shards", [2, 4])
def test_model_parallel_shards_merge(tmp_path, reference, n_shards):
    # Meta's reshard_mp splits a state dict for n ranks; 4 ranks exceed the 2 key/value heads, so wk/wv are copied.
    full = reference.state_dict()
    repeat = max(n_shards // TINY_PARAMS["n_kv_heads"], 1)
    shards = [reshard_mp([full], size=n_shards, rank=r, repeat_qk_qv=repeat) for r in range(n_shards)]
    assert shards[0]["tok_embeddings.weight"].shape[0] == TINY_PARAMS["vocab_size"] // n_shards
    _, merged = load_meta_checkpoint(save_meta_checkpoint(tmp_path, TINY_PARAMS, shards))
    for name, t in full.items():
        assert torch.equal(merged[name], t), name


def _write(tmp_path, params, state):
    return save_meta_checkpoint(tmp_path, params, [state])


def test_missing_things(tmp_path, tokenizer_path):
    with pytest.raises(WeightsError, match="checkpoint directory not found"):
        load_meta_checkpoint(tmp_path / "nowhere")
    with pytest.raises(WeightsError, match="no params.json"):
        load_meta_checkpoint(tmp_path)
    (tmp_path / "params.json").write_text(json.dumps(TINY_PARAMS))
    with pytest.raises(WeightsError, match="no consolidated"):
        load_meta_checkpoint(tmp_path)
    (tmp_path / "params.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read"):
        load_meta_checkpoint(tmp_path)


def test_params_disagree_with_weights(tmp_path, reference):
    with pytest.raises(WeightsError, match=r"shape mismatch.*layers.0.attention.wq.weight has shape \(64, 64\)"):
        load_meta_checkpoint(_write(tmp_path, dict(TINY_PARAMS, dim=128), reference.state_dict()))


def test_missing_and_unexpected_tensors(tmp_path, reference):
    state = dict(reference.state_dict())
    del state["layers.1.ffn_norm.weight"]
    state["layers.0.attention.bias"] = torch.zeros(3)
    with pytest.raises(WeightsError, match=r"missing 1 tensor\(s\) \(layers.1.ffn_norm.weight\).*unexpected"):
        load_meta_checkpoint(_write(tmp_path, TINY_PARAMS, state))


def test_corrupt_shard(tmp_path):
    (tmp_path / "params.json").write_text(json.dumps(TINY_PARAMS))
    (tmp_path / "consolidated.00.pth").write_bytes(b"garbage")
    with pytest.raises(WeightsError, match="cannot read .*consolidated.00.pth"):
        load_meta_checkpoint(tmp_path)


def test_vocabulary_smaller_than_tokenizer(tmp_path, model_parallel, tokenizer_path):
    from ..conftest import make_reference_model

    params = dict(TINY_PARAMS, vocab_size=1000)
    path = _write(tmp_path, params, make_reference_model(params, seed=3).state_dict())
    with pytest.raises(TokenizerError, match="tokenizer has 128256 tokens but the model's vocabulary has only 1000"):
        Llama.build(path, tokenizer_path, 32, 1, device="cpu")


def test_build_arguments(tiny_ckpt, tokenizer_path):
    with pytest.raises(ConfigError, match="unknown dtype 'float8'"):
        Llama.build(tiny_ckpt, tokenizer_path, 32, 1, device="cpu", dtype="float8")
    with pytest.raises(ConfigError, match="max_seq_len must be a positive integer, got 0"):
        Llama.build(tiny_ckpt, tokenizer_path, 0, 1, device="cpu")
    with pytest.raises(ConfigError, match="unknown device"):
        Llama.build(tiny_ckpt, tokenizer_path, 32, 1, device="toaster")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            Llama.build(tiny_ckpt, tokenizer_path, 32, 1, device="cuda")


def test_no_global_torch_state_changes(tiny_ckpt, tokenizer_path):
    before = (torch.get_default_dtype(), torch.get_default_device(), torch.initial_seed())
    Llama.build(tiny_ckpt, tokenizer_path, 32, 1, device="cpu", dtype="bf16", seed=123)
    assert (torch.get_default_dtype(), torch.get_default_device(), torch.initial_seed()) == before
