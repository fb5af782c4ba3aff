"""Every GGML format of lamina.kernels.types in lamina's C kernels (the block formats, and F16 and BF16 matrices),
against the `gguf` package's dequantizer (an independent decoder): each format's product on every kernel path this
CPU runs (and the AVX-512 source over SIMDe), its dequantization, files that mix formats, the clear error for a
format lamina does not read, and the memory a block model takes.

The blocks are random bytes (with finite float16 scales): every bit pattern a format can hold, so that no field of a
layout goes unread; F16 and BF16 values are random finite floats (subnormals and zeros among them)."""

from __future__ import annotations

import dataclasses

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lamina import WeightsError, kernels
from lamina.engine.config import EngineConfig
from lamina.engine.runner import ModelRunner
from lamina.kernels.types import TYPES
from lamina.quant import QEmbedding, QLinear, build_model
from lamina.weights import load_gguf

from .test_kernels import IDS, PATHS

pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"no native kernel: {kernels.unavailable_reason()}")

# Where each format keeps its float16 fields (d, and m or dmin): set to small finite values in random blocks.
F16_FIELDS = {
    "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0], "IQ4_NL": [0], "IQ4_XS": [0],
    "Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208],
}  # fmt: skip


def random_blocks(qtype: str, rows: int, cols: int, seed: int) -> np.ndarray:
    """uint8 [rows, row bytes]: random blocks of `qtype` whose float16 fields are in [0.001, 0.021) (F16 and BF16:
    random_floats)."""
    t, rng = TYPES[qtype], np.random.default_rng(seed)
    if t.family == "float":
        return random_floats(qtype, rows, cols, rng)
    b = rng.integers(0, 256, size=(rows, cols // t.block, t.nbytes), dtype=np.uint8)
    for at in F16_FIELDS[qtype]:
        scale = (rng.random((rows, cols // t.block)) * 0.02 + 0.001).astype(np.float16)
        b[..., at : at + 2] = scale.view(np.uint8).reshape(rows, cols // t.block, 2)
    return b.reshape(rows, -1)


def random_floats(qtype: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [rows, 2 cols]: random F16 or BF16 values of random sign and mantissa, with float16's exponents from
    its subnormals (and zeros) to 2**-4 (so |w| < 0.125, of a size with the block formats' weights); BF16 the same
    exponents in its 8-bit field, its own subnormals and zeros where float16 has its."""
    sign = rng.integers(0, 2, (rows, cols), dtype=np.uint16) << 15
    exp = rng.integers(0, 12, (rows, cols), dtype=np.uint16)  # float16's field: 0 subnormal, 15 is 2**0
    if qtype == "F16":
        bits = sign | (exp << 10) | rng.integers(0, 1 << 10, (rows, cols), dtype=np.uint16)
    else:
        exp = np.where(exp > 0, exp + 112, 0).astype(np.uint16)  # bfloat16's field: 127 is 2**0
        bits = sign | (exp << 7) | rng.integers(0, 1 << 7, (rows, cols), dtype=np.uint16)
    return bits.astype("<u2").view(np.uint8).reshape(rows, 2 * cols)


def reference_matrix(blocks: np.ndarray, qtype: str) -> torch.Tensor:
    w = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[qtype]).astype(np.float32)
    return torch.from_numpy(w).reshape(blocks.shape[0], -1)


def test_the_c_table_is_the_python_table():
    """Each format's id, block and bytes agree on both sides (checked when a library loads) and with gguf's (which
    counts F16 and BF16 in blocks of one value, lamina in blocks of 32)."""
    for name, t in TYPES.items():
        block, nbytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]]
        assert (t.block, t.nbytes) == ((block, nbytes) if t.family == "quant" else (32 * block, 32 * nbytes))
    for path, emulated in PATHS:
        lib = kernels.get(path, emulate=emulated).lib
        assert [(lib.lamina_type_block(t.kid), lib.lamina_type_bytes(t.kid)) for t in TYPES.values()] == [
            (t.block, t.nbytes) for t in TYPES.values()
        ]


@pytest.mark.parametrize("path, emulated", PATHS, ids=IDS)
@pytest.mark.parametrize("qtype", list(TYPES))
def test_each_format_dequantizes_as_gguf_does(path, emulated, qtype):
    blocks = random_blocks(qtype, 7, 512, seed=1)
    expected = reference_matrix(blocks, qtype)
    ours = kernels.get(path, emulate=emulated).dequantize(TYPES[qtype].kid, torch.from_numpy(blocks), 7, 512)
    # the same float operations up to one rounding (d * sc * q is grouped as GGML's or as (d) * (sc * q))
    torch.testing.assert_close(ours, expected, rtol=2e-7, atol=0)


@pytest.mark.parametrize("path, emulated", PATHS, ids=IDS)
@pytest.mark.parametrize("qtype", list(TYPES))
def test_each_format_product_equals_the_float_product(path, emulated, qtype):
    """Every register-tile shape: 1-5 activation rows (one tile and its edges), on AVX-512 the panels' 6 and 8 (one
    group of 8 rows or fewer in 256-bit vectors, part-filled and whole), 17 (a group of 16 in 512-bit vectors, then
    one of a row) and 25 (the second group of 16 part-filled, in 512-bit vectors), an odd number of
    weight rows, rows of one 256-weight block, of 6 (1536: what llama.cpp writes ffn_down in on the default
    model) and, for the 32-weight formats, of 18 blocks of 32 (576: the default model's rows, 8-chunk groups and a
    tail). Bound: int16 activations per block of 32 carry ~3e-5 of each block's largest value; on random-byte
    weights (uniform, so heavier than a trained matrix's) that is within 2e-4 of the output's scale (measured
    <= 1.2e-4 with an outlier activation of 40 on rows of 256; F16 and BF16, whose random floats' few largest weights
    dominate a row, 1.64e-4 on every path, the activations' error alone)."""
    kern = kernels.get(path, emulate=emulated)
    shapes = [(13, 256), (40, 1536)] + ([(9, 576)] if TYPES[qtype].block == 32 else [])
    for n, k in shapes:
        blocks = random_blocks(qtype, n, k, seed=n)
        w = reference_matrix(blocks, qtype)
        for rows in (1, 2, 3, 4, 5, 6, 8, 17, 25):
            x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
            x[:, 3] = 40.0  # an outlier, as activations after SwiGLU have
            if rows > 2:
                x[1] = 0.0
            expected = F.linear(x, w)
            out = kern.qmatmul(x, torch.from_numpy(blocks), qtype, n)
            torch.testing.assert_close(out, expected, rtol=0, atol=2e-4 * expected.abs().max().item())


def test_a_layer_reads_every_format():
    for qtype in TYPES:
        layer = QLinear(torch.from_numpy(random_blocks(qtype, 8, 256, seed=3)), qtype, 256)
        x = torch.randn(2, 256)
        expected = F.linear(x, reference_matrix(layer.blocks.numpy(), qtype))
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=2e-4 * expected.abs().max().item())
    with pytest.raises(ValueError, match="GGML type IQ1_S is not one lamina reads; it reads F32, F16, BF16, Q4_1"):
        QLinear(torch.zeros(8, 50, dtype=torch.uint8), "IQ1_S", 256)
    with pytest.raises(ValueError, match="Q4_K blocks \\(8, 100\\) do not hold rows of 256 weights"):
        QLinear(torch.zeros(8, 100, dtype=torch.uint8), "Q4_K", 256)


# ---- whole models in files that mix formats ------------------------------------------------------------------

DIM, HIDDEN, VOCAB, LAYERS = 256, 512, 320, 2


def _write_model(path, formats: dict[str, str], tied: bool = False, unread: str | None = None) -> dict:
    """A random llama GGUF with dim 256 (whole 256-weight blocks), the format of each tensor kind from `formats`
    ("attn_q", "attn_v", "ffn_down", "output", "token_embd", ...; "*" for the rest), and norms in F32. Returns the
    tensors as gguf dequantizes them. `unread`: one tensor stored in that GGML type instead (a type lamina does not
    read)."""
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(DIM)
    writer.add_feed_forward_length(HIDDEN)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_rope_dimension_count(DIM // 4)
    writer.add_rope_freq_base(500000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(VOCAB)
    shapes = {"token_embd.weight": (VOCAB, DIM), "output_norm.weight": (DIM,)}
    if not tied:
        shapes["output.weight"] = (VOCAB, DIM)
    for i in range(LAYERS):
        kv = DIM // 2
        for name, shape in {
            "attn_norm": (DIM,), "ffn_norm": (DIM,), "attn_q": (DIM, DIM), "attn_k": (kv, DIM), "attn_v": (kv, DIM),
            "attn_output": (DIM, DIM), "ffn_gate": (HIDDEN, DIM), "ffn_up": (HIDDEN, DIM), "ffn_down": (DIM, HIDDEN),
        }.items():  # fmt: skip
            shapes[f"blk.{i}.{name}.weight"] = shape
    tensors = {}
    for seed, (name, shape) in enumerate(shapes.items()):
        if len(shape) == 1:
            x = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
            writer.add_tensor(name, x)
            tensors[name] = torch.from_numpy(x)
            continue
        kind = name.removeprefix("blk.").split(".")[-2] if name.startswith("blk.") else name.split(".")[0]
        qtype = formats.get(kind, formats["*"])
        if unread and name == "blk.1.attn_k.weight":
            qtype = unread
        if qtype in TYPES:
            raw = random_blocks(qtype, shape[0], shape[1], seed)
            # scales for weights of ~0.02-0.05: the model's activations stay moderate through two layers
            writer.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=gguf.GGMLQuantizationType[qtype])
            tensors[name] = reference_matrix(raw, qtype)
        else:
            size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
            raw = np.zeros((shape[0], shape[1] // size[0] * size[1]), dtype=np.uint8)
            writer.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=gguf.GGMLQuantizationType[qtype])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tensors


# A Q4_K_M-like mix (llama.cpp writes Q6_K attn_v and ffn_down in some layers, Q6_K output), one of every block
# format, and one of 16-bit floats.
MIXES = {
    "q4_k_m": {"*": "Q4_K", "attn_v": "Q6_K", "ffn_down": "Q6_K", "output": "Q6_K", "token_embd": "Q4_K"},
    "every": {
        "*": "Q5_K", "attn_q": "Q2_K", "attn_k": "Q3_K", "attn_v": "IQ4_XS", "attn_output": "Q4_0",
        "ffn_gate": "Q5_0", "ffn_up": "IQ4_NL", "ffn_down": "Q5_1", "output": "Q8_0", "token_embd": "Q4_K",
    },
    # 16-bit floats (fused q/k/v in F16, gate/up in BF16) with a block format, F16 embeddings and BF16 logits
    "float16": {
        "*": "F16", "ffn_gate": "BF16", "ffn_up": "BF16", "ffn_down": "Q6_K", "output": "BF16", "token_embd": "F16",
    },
}  # fmt: skip


def _runner(path, mode: str, native: bool) -> ModelRunner:
    """The GGUF at `path` built with quantize=`mode` (float32, on the CPU) in a runner of 4 rows of 128 positions."""
    config, state, _ = load_gguf(path, keep=mode != "none")
    model = build_model(config, state, mode, device=torch.device("cpu"), dtype=torch.float32)
    engine = EngineConfig(max_seq_len=128, max_batch_size=4, device=torch.device("cpu"), dtype=torch.float32)
    return ModelRunner(model, engine, native=native)


@pytest.mark.parametrize("mix", list(MIXES))
def test_a_mixed_file_runs_in_its_blocks_as_the_dequantized_model(tmp_path, mix):
    """Kept in blocks (quantize='gguf', the native decode step) and dequantized to float32 (quantize='none'), the same
    file gives the same prompt logits and the same logits a decode step (both short: lamina's int16 kernels, within
    the products' bound grown over two layers, 1e-3 of scale; measured 1.2e-4) and the same greedy tokens."""
    path = tmp_path / f"{mix}.gguf"
    _write_model(path, MIXES[mix])
    ours, exact = _runner(path, "gguf", native=True), _runner(path, "none", native=False)
    kinds = {m.qtype for m in ours.model.modules() if isinstance(m, (QLinear, QEmbedding))}
    assert kinds == set(MIXES[mix].values()) - ({"Q5_K"} if mix == "every" else set())
    assert ours.native is not None, "the C decode step runs the mixed model"
    assert_prefill_and_greedy_decode_agree(ours, exact, [[1, 5, 9, 200, 33], [7, 7, 300]], ours.native)


def assert_prefill_and_greedy_decode_agree(ours, exact, prompts, step) -> None:
    """Two runners on the same weights give prompt logits within 1e-3 of scale, then 8 greedy decode steps (`step`:
    ours) with logits within 1e-3 of scale and the same tokens; one sequence per prompt, in block b."""
    tables = [[b] for b in range(len(prompts))]
    with torch.inference_mode():
        a, b = (runner.model.logits(runner.prefill(prompts, tables)) for runner in (ours, exact))
        torch.testing.assert_close(a, b, rtol=0, atol=1e-3 * b.abs().max().item())
        last = [sum(len(p) for p in prompts[: i + 1]) - 1 for i in range(len(prompts))]
        tokens, positions = b[last].argmax(-1).tolist(), [len(p) for p in prompts]
        for _ in range(8):
            logits, expected = step(tokens, tables, positions), exact.decode(tokens, tables, positions)
            torch.testing.assert_close(logits, expected, rtol=0, atol=1e-3 * expected.abs().max().item())
            assert logits.argmax(-1).tolist() == expected.argmax(-1).tolist()
            tokens, positions = expected.argmax(-1).tolist(), [p + 1 for p in positions]


def test_a_type_lamina_does_not_read_is_named(tmp_path):
    path = tmp_path / "iq1.gguf"
    _write_model(path, {"*": "Q4_K"}, unread="IQ1_S")
    with pytest.raises(WeightsError, match=r"tensor blk\.1\.attn_k\.weight has GGML type IQ1_S, which lamina does "
                       r"not read; it reads F32, F16, BF16, Q4_1, Q8_0, Q4_0, Q5_0, Q5_1, IQ4_NL, IQ4_XS, Q2_K"):
        load_gguf(path, keep=True)


def _rss_mib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


_MEMORY_PROBE = """
import json, sys, torch, lamina
from lamina.loader import default_model_path
def rss():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmRSS:"))
torch.zeros(1)
before = rss()
llama = lamina.load(max_seq_len=256, max_batch_size=2)
after = rss()
kv = sum(t.numel() * t.element_size() for layer in llama.runner.cache.layers for t in layer
         for t in ([t.data, t.scales] if hasattr(t, "scales") else [t]))
print(json.dumps({"before": before, "after": after, "kv": kv, "file": default_model_path().stat().st_size}))
"""


def test_a_loaded_block_model_takes_its_file_size_and_a_fixed_overhead():
    """The weights stay in the file's blocks: loading the default model (Q4_1 and Q8_0) grows the process by at most
    the file's size, its KV cache and a fixed runtime overhead of 64 MiB (the tokenizer, the chat template, the
    kernels' library, PyTorch's first kernels and the engine's buffers: measured 51 MiB on the default model, Intel
    Sapphire Rapids, 2026-12-04), in a fresh process."""
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _MEMORY_PROBE], capture_output=True, text=True, timeout=300, check=True)
    m = json.loads(out.stdout.strip().splitlines()[-1])
    grown = m["after"] - m["before"]
    assert grown <= m["file"] + m["kv"] + 64 * 2**20, {k: v / 2**20 for k, v in m.items()}
