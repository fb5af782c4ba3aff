"""ModelConfig from Meta params.json files, checked against the shapes Meta published for each model."""

import pytest

from lamina import ConfigError, ModelConfig

# Meta's params.json for published models, and the SwiGLU size each model's weights have (w1: [hidden, dim]).
PUBLISHED = [
    (
        {
            "dim": 4096,
            "ffn_dim_multiplier": 1.3,
            "multiple_of": 1024,
            "n_heads": 32,
            "n_kv_heads": 8,
            "n_layers": 32,
            "norm_eps": 1e-05,
            "rope_theta": 500000.0,
            "use_scaled_rope": True,
            "vocab_size": 128256,
        },
        14336,
        8.0,
    ),
    (
        {
            "dim": 8192,
            "ffn_dim_multiplier": 1.3,
            "multiple_of": 4096,
            "n_heads": 64,
            "n_kv_heads": 8,
            "n_layers": 80,
            "norm_eps": 1e-05,
            "rope_theta": 500000.0,
            "use_scaled_rope": True,
            "vocab_size": 128256,
        },
        28672,
        8.0,
    ),
    (
        {
            "dim": 2048,
            "ffn_dim_multiplier": 1.5,
            "multiple_of": 256,
            "n_heads": 32,
            "n_kv_heads": 8,
            "n_layers": 16,
            "norm_eps": 1e-05,
            "rope_theta": 500000.0,
            "use_scaled_rope": True,
            "vocab_size": 128256,
        },
        8192,
        32.0,
    ),
    (
        {
            "dim": 3072,
            "ffn_dim_multiplier": 1.0,
            "multiple_of": 256,
            "n_heads": 24,
            "n_kv_heads": 8,
            "n_layers": 28,
            "norm_eps": 1e-05,
            "rope_theta": 500000.0,
            "use_scaled_rope": True,
            "vocab_size": 128256,
        },
        8192,
        32.0,
    ),
]


@pytest.mark.parametrize("params, hidden, factor", PUBLISHED)
def test_published_params(params, hidden, factor):
    config = ModelConfig.from_meta(params)
    assert config.hidden_dim == hidden
    assert config.head_dim == params["dim"] // params["n_heads"]
    assert config.rope_scaling.factor == factor


def test_explicit_scaling_factor_and_no_scaling():
    params = dict(PUBLISHED[0][0], rope_scaling_factor=16)
    assert ModelConfig.from_meta(params).rope_scaling.factor == 16
    assert ModelConfig.from_meta(dict(PUBLISHED[0][0], use_scaled_rope=False)).rope_scaling is None


@pytest.mark.parametrize(
    "params, message",
    [
        ({"dim": 64, "n_layers": 2, "n_heads": 4}, "lacks required field"),
        ({"dim": 64, "n_layers": 2, "n_heads": 4, "vocab_size": -1}, "vocab_size must be a positive integer"),
        ({"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 3, "vocab_size": 10}, "multiple of n_kv_heads"),
        ({"dim": 64, "n_layers": 2, "n_heads": 4, "vocab_size": 10, "vision_chunk_size": 560}, "vision model"),
        ({"dim": "big", "n_layers": 2, "n_heads": 4, "vocab_size": 10}, "wrong type"),
    ],
)
def test_bad_params(params, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_meta(params)


def test_presets_by_exact_name():
    assert ModelConfig.preset("llama3.1-8b").hidden_dim == 14336
    with pytest.raises(ConfigError, match="unknown preset 'llama3.1-8B'"):
        ModelConfig.preset("llama3.1-8B")
