"""ModelConfig: the frozen description of a Llama-family transformer; its readers (Meta, HF, GGUF) and presets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from lamina.errors import ConfigError


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1 frequency-dependent RoPE scaling (`rope_type: llama3` in Hugging Face configs).

    Wavelengths shorter than `original_max_position_embeddings / high_freq_factor` are kept, those longer than
    `original_max_position_embeddings / low_freq_factor` are divided by `factor`, and the band between is blended.
    `factor` is 8 for Llama 3.1 and 32 for the Llama 3.2 1B/3B models.
    """

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.factor <= 0 or self.low_freq_factor <= 0 or self.high_freq_factor <= self.low_freq_factor:
            raise ConfigError(
                f"invalid RoPE scaling {self}: need factor > 0 and 0 < low_freq_factor < high_freq_factor"
            )


@dataclass(frozen=True)
class ModelConfig:
    """Shapes and constants of the network. Runtime limits (batch size, context length) are not model properties:
    they live in the engine's configuration."""

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    hidden_dim: int  # SwiGLU inner size (w1/w3 rows)
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = None
    head_dim: int = 0  # 0 means dim // n_heads
    tie_embeddings: bool = False  # output projection shares tok_embeddings' weight
    context_length: int = 0  # positions the model was trained for; 0 when the checkpoint does not say

    def __post_init__(self):
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"model config field {name} must be a positive integer, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim == 0:
            if self.dim % self.n_heads:
                raise ConfigError(f"dim ({self.dim}) must be a multiple of n_heads ({self.n_heads})")
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if not self.norm_eps > 0 or not self.rope_theta > 0:
            raise ConfigError(f"norm_eps and rope_theta must be positive, got {self.norm_eps} and {self.rope_theta}")

    @classmethod
    def from_meta(cls, params: Mapping[str, Any]) -> "ModelConfig":
        """Read a Meta `params.json` (Llama 3, 3.1, 3.2 text models).

        Meta's files carry `use_scaled_rope` but not the scaling factor; it is read from `rope_scaling_factor` when
        present, else taken from the preset whose shapes match exactly (32 for Llama 3.2 1B/3B), else 8 (Llama 3.1).
        """
        if any(key.startswith("vision") for key in params):
            raise ConfigError("params.json describes a vision model; lamina supports Llama text models only")
        missing = [key for key in ("dim", "n_layers", "n_heads", "vocab_size") if key not in params]
        if missing:
            raise ConfigError(f"params.json lacks required field(s) {', '.join(missing)}")
        try:
            dim, n_heads = int(params["dim"]), int(params["n_heads"])
            n_kv_heads = int(params.get("n_kv_heads") or n_heads)
            multiple_of = int(params.get("multiple_of", 256))
            multiplier = params.get("ffn_dim_multiplier")
            # Meta's SwiGLU sizing: 2/3 of 4*dim, times the multiplier, rounded up to multiple_of.
            hidden = int(2 * (4 * dim) / 3)
            if multiplier is not None:
                hidden = int(float(multiplier) * hidden)
            hidden = multiple_of * ((hidden + multiple_of - 1) // multiple_of)
            fields = dict(
                dim=dim,
                n_layers=int(params["n_layers"]),
                n_heads=n_heads,
                n_kv_heads=n_kv_heads,
                vocab_size=int(params["vocab_size"]),
                hidden_dim=hidden,
                norm_eps=float(params.get("norm_eps", 1e-5)),
                rope_theta=float(params.get("rope_theta", 500000.0)),
            )
            if params.get("use_scaled_rope", False):
                factor = params.get("rope_scaling_factor")
                if factor is None:
                    match = next((p for p in PRESETS.values() if _same_shapes(p, fields)), None)
                    factor = match.rope_scaling.factor if match is not None and match.rope_scaling else 8.0
                fields["rope_scaling"] = RopeScaling(factor=float(factor))
        except (TypeError, ValueError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"params.json holds a value of the wrong type: {e}") from None
        return cls(**fields)

    @classmethod
    def from_hf(cls, config: Mapping[str, Any]) -> "ModelConfig":
        """Read a Hugging Face `config.json` of a Llama-architecture model (`LlamaForCausalLM`)."""
        arch = config.get("architectures") or []
        if config.get("model_type") != "llama" and "LlamaForCausalLM" not in arch:
            found = config.get("model_type") or ", ".join(arch) or "unknown"
            raise ConfigError(f"config.json describes a {found!r} model; lamina runs Llama-architecture models only")
        if config.get("attention_bias") or config.get("mlp_bias"):
            raise ConfigError("config.json asks for attention or MLP biases, which Llama models do not have")
        missing = [
            k
            for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size")
            if k not in config
        ]
        if missing:
            raise ConfigError(f"config.json lacks required field(s) {', '.join(missing)}")
        # transformers 5 keeps rope settings in rope_parameters; earlier versions in rope_theta + rope_scaling.
        rope = dict(config.get("rope_scaling") or {})
        rope.update(config.get("rope_parameters") or {})
        theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
        kind = rope.get("rope_type", rope.get("type", "default"))
        scaling = None
        if kind == "llama3":
            try:
                scaling = RopeScaling(
                    factor=float(rope["factor"]),
                    low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
                    high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
                    original_max_position_embeddings=int(rope.get("original_max_position_embeddings", 8192)),
                )
            except KeyError:
                raise ConfigError("config.json rope scaling of type llama3 lacks its 'factor'") from None
        elif kind != "default":
            raise ConfigError(f"RoPE scaling of type {kind!r} is not supported (supported: default, llama3)")
        try:
            return cls(
                dim=int(config["hidden_size"]),
                n_layers=int(config["num_hidden_layers"]),
                n_heads=int(config["num_attention_heads"]),
                n_kv_heads=int(config.get("num_key_value_heads") or config["num_attention_heads"]),
                vocab_size=int(config["vocab_size"]),
                hidden_dim=int(config["intermediate_size"]),
                norm_eps=float(config.get("rms_norm_eps", 1e-6)),
                rope_theta=float(theta),
                rope_scaling=scaling,
                head_dim=int(config.get("head_dim") or 0),
                tie_embeddings=bool(config.get("tie_word_embeddings", False)),
                context_length=int(config.get("max_position_embeddings") or 0),
            )
        except (TypeError, ValueError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"config.json holds a value of the wrong type: {e}") from None

    @classmethod
    def from_gguf(cls, fields: Mapping[str, Any], *, has_output: bool, rope_scaling: RopeScaling | None = None):
        """Read GGUF metadata of architecture `llama` (llama.cpp's key names). `has_output`: whether the file holds
        an `output.weight` tensor (without one the output projection is tied to the embeddings). Llama 3.1 GGUFs
        carry RoPE scaling as a tensor of per-frequency factors, which the weight loader turns into `rope_scaling`."""
        arch = fields.get("general.architecture")
        if arch != "llama":
            raise ConfigError(f"GGUF architecture {arch!r} is not supported; lamina runs 'llama' models")

        def get(key: str, default: Any = None) -> Any:
            value = fields.get(f"llama.{key}", default)
            if value is None:
                raise ConfigError(f"GGUF metadata lacks llama.{key}")
            return value

        n_heads = int(get("attention.head_count"))
        dim = int(get("embedding_length"))
        vocab = fields.get("llama.vocab_size") or len(fields.get("tokenizer.ggml.tokens") or ())
        kind = fields.get("llama.rope.scaling.type", "none")
        if kind not in ("none", None) and rope_scaling is None:
            raise ConfigError(f"GGUF RoPE scaling of type {kind!r} is not supported")
        return cls(
            dim=dim,
            n_layers=int(get("block_count")),
            n_heads=n_heads,
            n_kv_heads=int(get("attention.head_count_kv", n_heads)),
            vocab_size=int(vocab),
            hidden_dim=int(get("feed_forward_length")),
            norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            rope_scaling=rope_scaling,
            head_dim=int(fields.get("llama.attention.key_length") or fields.get("llama.rope.dimension_count") or 0),
            tie_embeddings=not has_output,
            context_length=int(fields.get("llama.context_length") or 0),
        )

    @property
    def n_params(self) -> int:
        """Weights in the model (a tied output projection counted once)."""
        attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        layer = attn + 3 * self.dim * self.hidden_dim + 2 * self.dim
        return self.vocab_size * self.dim * (1 if self.tie_embeddings else 2) + self.n_layers * layer + self.dim

    @classmethod
    def preset(cls, name: str) -> "ModelConfig":
        """The configuration of a published model, by exact name (see `PRESETS`)."""
        try:
            return PRESETS[name]
        except KeyError:
            raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}") from None


def _same_shapes(preset: ModelConfig, fields: Mapping[str, Any]) -> bool:
    keys = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim")
    return all(getattr(preset, k) == fields[k] for k in keys)


_L31 = RopeScaling(factor=8.0)
_L32 = RopeScaling(factor=32.0)
_V3 = 128256

PRESETS: dict[str, ModelConfig] = {
    "llama3-8b": ModelConfig(4096, 32, 32, 8, _V3, 14336),
    "llama3-70b": ModelConfig(8192, 80, 64, 8, _V3, 28672),
    "llama3.1-8b": ModelConfig(4096, 32, 32, 8, _V3, 14336, rope_scaling=_L31),
    "llama3.1-70b": ModelConfig(8192, 80, 64, 8, _V3, 28672, rope_scaling=_L31),
    "llama3.2-1b": ModelConfig(2048, 16, 32, 8, _V3, 8192, rope_scaling=_L32),
    "llama3.2-3b": ModelConfig(3072, 28, 24, 8, _V3, 8192, rope_scaling=_L32),
}
