"""Hugging Face checkpoints written by transformers itself, loaded by lamina and compared with transformers' model."""

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lamina import ConfigError, WeightsError  # noqa: E402
from lamina.engine.config import EngineConfig  # noqa: E402
from lamina.engine.runner import ModelRunner  # noqa: E402
from lamina.model import build_transformer  # noqa: E402
from lamina.weights import load_hf_checkpoint  # noqa: E402

VOCAB = 512


def make_hf_llama(path, *, tie=True, shard=False, rope_scaling=True, seed=0, vocab_size=VOCAB):
    """A random LlamaForCausalLM saved with save_pretrained. Its llama3 RoPE scaling uses a short original context
    (32) so that the scaled frequencies matter within a short test sequence."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)  # transformers initialises from the global generator; this is a test helper
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tie,
        rope_theta=10000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 4.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        }
        if rope_scaling
        else None,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # larger weights than the default init, so that layers and RoPE visibly matter
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.08)
    model.save_pretrained(path, max_shard_size="200KB" if shard else "10GB")
    return model


def lamina_logits(path, ids):
    config, state = load_hf_checkpoint(path)
    model = build_transformer(config, state, device=torch.device("cpu"), dtype=torch.float32)
    runner = ModelRunner(model, EngineConfig(256, 1, torch.device("cpu"), torch.float32))
    with torch.inference_mode():
        return config, model.logits(runner.prefill([ids], [[0]]))


@pytest.mark.parametrize("tie, shard", [(True, False), (False, True)])
def test_logits_equal_transformers(tmp_path, tie, shard):
    hf = make_hf_llama(tmp_path, tie=tie, shard=shard)
    assert (tmp_path / "model.safetensors.index.json").is_file() == shard
    ids = torch.randint(0, VOCAB, (120,), generator=torch.Generator().manual_seed(1)).tolist()
    config, ours = lamina_logits(tmp_path, ids)
    with torch.inference_mode():
        theirs = hf(torch.tensor([ids])).logits[0]
    assert config.tie_embeddings == tie and config.rope_scaling.original_max_position_embeddings == 32
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_rope_scaling_is_applied(tmp_path):
    # The same weights without the scaling give different logits: the comparison above did exercise it.
    make_hf_llama(tmp_path)
    ids = list(range(100))
    _, scaled = lamina_logits(tmp_path, ids)
    config = json.loads((tmp_path / "config.json").read_text())
    for key in ("rope_scaling", "rope_parameters"):
        if isinstance(config.get(key), dict):
            config[key] = {"rope_type": "default", "rope_theta": 10000.0}
    (tmp_path / "config.json").write_text(json.dumps(config))
    _, plain = lamina_logits(tmp_path, ids)
    assert not torch.allclose(scaled[-20:], plain[-20:], atol=1e-3)


def test_bad_hf_directories(tmp_path):
    make_hf_llama(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(
        json.dumps(dict(config, model_type="mistral", architectures=["MistralForCausalLM"]))
    )
    with pytest.raises(ConfigError, match="'mistral' model; lamina runs Llama-architecture models only"):
        load_hf_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(
        json.dumps(dict(config, rope_scaling={"rope_type": "yarn", "factor": 2.0}, rope_parameters=None))
    )
    with pytest.raises(ConfigError, match="RoPE scaling of type 'yarn' is not supported"):
        load_hf_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(dict(config, hidden_size=128)))
    with pytest.raises(WeightsError, match="shape mismatch"):
        load_hf_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(WeightsError, match="has no model.safetensors"):
        load_hf_checkpoint(tmp_path)
