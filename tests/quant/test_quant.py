"""Weight-only quantization in GGML blocks: the codecs against the `gguf` package (the format's reference), the native
kernel against a float matmul of the same weights, a GGUF's blocks carried over byte for byte, and the quality cost on
the default model (perplexity of a held passage within 1% of float32 for int8 and 5% for int4, as the performance
issue asks; the default "gguf" mode runs the file's own weights, so its greedy output matches float32 on them)."""

import math
import os
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import lamina
from lamina import ConfigError, kernels
from lamina.quant import QEmbedding, QLinear, ggml
from lamina.quant import linear as qlinear

PASSAGE = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named after the "
    "engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889. Locally nicknamed "
    '"La dame de fer" (French for "Iron Lady"), it was constructed as the centrepiece of the 1889 World\'s Fair, and '
    "to crown the centennial anniversary of the French Revolution. Although initially criticised by some of France's "
    "leading artists and intellectuals for its design, it has since become a global cultural icon of France."
)


def _weights(n, k, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=gen) * torch.linspace(0.01, 2, n)[:, None]


def _reference_dequantize(blocks: torch.Tensor, qtype: str, shape) -> torch.Tensor:
    raw = blocks.numpy().reshape(shape[0], -1)
    return torch.from_numpy(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype]).astype(np.float32))


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_1"])
def test_blocks_are_ggml_blocks(qtype):
    w = _weights(16, 96)
    blocks = ggml.QUANTIZE[qtype](w)
    assert blocks.dtype == torch.uint8 and blocks.shape == (16, 3 * ggml.BLOCK_BYTES[qtype])
    ours = ggml.dequantize(blocks, qtype)
    torch.testing.assert_close(ours, _reference_dequantize(blocks, qtype, w.shape), rtol=0, atol=0)
    # Within half a step of the block's grid (plus float16 rounding of the scales).
    groups = w.reshape(16, 3, 32)
    if qtype == "Q8_0":
        step = groups.abs().amax(-1) / 127
    else:
        lo, hi = groups.aminmax(dim=-1)
        step = (hi - lo) / 15
    assert ((ours - w).abs() <= step.repeat_interleave(32, dim=1) * 0.51 + 2e-3 * w.abs()).all()


def test_q4_0_becomes_the_same_weights_as_q4_1():
    w = _weights(8, 64).numpy()
    q4_0 = torch.from_numpy(gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q4_0).view(np.uint8))
    converted = ggml.q4_0_to_q4_1(q4_0)
    expected = _reference_dequantize(q4_0, "Q4_0", w.shape)
    torch.testing.assert_close(ggml.dequantize(converted, "Q4_1"), expected, rtol=0, atol=0)
    torch.testing.assert_close(ggml.dequantize(q4_0, "Q4_0"), expected, rtol=0, atol=0)


needs_kernel = pytest.mark.skipif(not kernels.available(), reason=f"no native kernel: {kernels.unavailable_reason()}")


@needs_kernel
@pytest.mark.parametrize("qtype", ["Q4_1", "Q8_0"])
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 17])
@pytest.mark.parametrize("n,k", [(12, 96), (256, 64), (40, 1536)])
def test_kernel_equals_float_matmul_of_the_same_weights(qtype, rows, n, k):
    layer = QLinear.from_float(_weights(n, k, seed=rows), qtype)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(k))
    x[:, 3] = 40.0  # an outlier, as activations after SwiGLU have
    if rows > 2:
        x[1] = 0.0  # an all-zero row
    expected = F.linear(x, layer.dequantized())
    out = kernels.qmatmul(x, layer.blocks, qtype, n)
    # int16 activations per block of 32: ~3e-5 of each block's largest value.
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_layer_native_and_dequantized_paths_agree(monkeypatch):
    layer = QLinear.from_float(_weights(64, 128), "Q4_1")
    assert layer.native
    x = torch.randn(2, 3, 128)
    native = layer(x)
    monkeypatch.setattr(qlinear, "NATIVE_MAX_ROWS", 0)  # every product through dequantize + float matmul,
    layer.prefill_dtype = torch.float32  # not through the int16 kernels (the many-row default on AVX-512)
    dequantized = layer(x)
    assert native.shape == (2, 3, 64)
    torch.testing.assert_close(native, dequantized, rtol=1e-4, atol=1e-4 * dequantized.abs().max().item())


@needs_kernel
def test_kernel_with_no_rows():
    layer = QLinear.from_float(_weights(8, 64), "Q4_1")
    assert kernels.qmatmul(torch.empty(0, 64), layer.blocks, "Q4_1", 8).shape == (0, 8)


def test_kernel_rejects_mismatched_blocks():
    layer = QLinear.from_float(_weights(8, 64), "Q8_0")
    with pytest.raises(ValueError, match="do not match"):
        kernels.qmatmul(torch.randn(1, 96), layer.blocks, "Q8_0", 8)
    with pytest.raises(ValueError, match="rows of 96 weights"):
        QLinear(layer.blocks, "Q8_0", 96)


def test_without_the_native_kernel_everything_still_runs():
    code = (
        "import lamina; from lamina import kernels; assert not kernels.available(); "
        "l = lamina.load(max_seq_len=64); print(kernels.unavailable_reason()); "
        "print(l.text_completion(['The capital of France is'], temperature=0, max_gen_len=3)[0]['generation'])"
    )
    env = dict(os.environ, LAMINA_NATIVE="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == "disabled by LAMINA_NATIVE=0"
    assert out.stdout.splitlines()[1].strip().startswith("Paris")


def _weight(module) -> torch.Tensor:
    return module.dequantized() if isinstance(module, QLinear) else module.weight


def _projections(model, i) -> dict[str, torch.Tensor]:
    """Layer i's projection weights by GGUF name, read back from the built model (fused ones split again)."""
    attn, ffn, c = model.layers[i].attention, model.layers[i].feed_forward, model.config
    if attn.wqkv is not None:
        q, k, v = _weight(attn.wqkv).split([c.dim, c.n_kv_heads * c.head_dim, c.n_kv_heads * c.head_dim])
    else:
        q, k, v = _weight(attn.wq), _weight(attn.wk), _weight(attn.wv)
    gate, up = _weight(ffn.w13).chunk(2) if ffn.w13 is not None else (_weight(ffn.w1), _weight(ffn.w3))
    names = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]
    return dict(zip(names, [q, k, v, _weight(attn.wo), gate, up, _weight(ffn.w2)]))


@pytest.mark.parametrize("qtypes", [("Q4_1",), ("Q4_0", "Q8_0", "Q4_1", "F16")])
def test_gguf_blocks_carry_over_exactly(tmp_path, qtypes):
    from lamina.quant import Blocks, build_model
    from lamina.weights import load_gguf
    from lamina.weights.gguf_file import read_gguf_file

    from ..weights.test_gguf import _write_llama_gguf

    path = tmp_path / "q.gguf"
    expected = _write_llama_gguf(path, qtypes=qtypes)
    _, state, _ = load_gguf(path, keep=True)
    raw = read_gguf_file(path).tensors["blk.0.attn_q.weight"]
    assert isinstance(state["layers.0.attention.wq.weight"], Blocks)
    assert bytes(state["layers.0.attention.wq.weight"].data.numpy()) == bytes(raw.data)  # the file's own bytes
    config, state, _ = load_gguf(path, keep=True)
    model = build_model(config, state, "gguf", device=torch.device("cpu"), dtype=torch.float32)
    if qtypes == ("Q4_1",):
        assert model.layers[0].attention.wqkv is not None and model.layers[0].feed_forward.w13 is not None
    for i in range(2):
        for name, weight in _projections(model, i).items():
            torch.testing.assert_close(weight, expected[f"blk.{i}.{name}.weight"], rtol=0, atol=0)


def test_unknown_mode():
    with pytest.raises(ConfigError, match="unknown quantization 'int3'"):
        lamina.load(quantize="int3")


# The default model, in each mode.


@pytest.fixture(scope="module")
def fp32():
    return lamina.load(device="cpu", dtype="float32", max_seq_len=512, quantize="none")


@pytest.fixture(scope="module")
def default():
    return lamina.load(device="cpu", dtype="float32", max_seq_len=512)


def _perplexity(llama, ids):
    (_,), (lps,) = llama.generate([ids], 0, logprobs=True, echo=True)
    return math.exp(-sum(lps[1:]) / (len(lps) - 1))


@needs_kernel
def test_default_on_cpu_keeps_the_files_blocks(default):
    layers = [m for m in default.model.modules() if isinstance(m, QLinear)]
    # wq/wk/wv and w1/w3 fused: four Q4_1 products a layer, and the tied Q8_0 output shared with the embedding.
    assert sum(m.qtype == "Q4_1" for m in layers) == 4 * 30 and all(m.native for m in layers)
    assert default.model.output.qtype == "Q8_0" and isinstance(default.model.tok_embeddings, QEmbedding)
    assert default.model.output.blocks is default.model.tok_embeddings.blocks
    assert not any(isinstance(m, torch.nn.Linear) for m in default.model.modules())
    stored = sum(b.numel() * b.element_size() for b in default.model.buffers() if b.dtype == torch.uint8)
    assert stored < 100e6  # the file's 4.6-bit weights, not a float copy (float32 would be 540 MB)


@needs_kernel
@pytest.mark.parametrize("mode,bound", [("gguf", 0.002), ("int8", 0.01), ("int4", 0.05)])
def test_perplexity_through_the_kernel(fp32, mode, bound, monkeypatch):
    llama = lamina.load(device="cpu", dtype="float32", max_seq_len=512, quantize=mode)
    ids = fp32.tokenizer.encode(PASSAGE, bos=fp32.tokenizer.add_bos, eos=False)
    monkeypatch.setattr(qlinear, "NATIVE_MAX_ROWS", 10**9)  # score every row through the kernel, not dequantized
    assert abs(_perplexity(llama, ids) / _perplexity(fp32, ids) - 1) < bound


@needs_kernel
def test_default_greedy_equals_float32_on_the_same_weights(fp32, default):
    dialogs = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "user", "content": "Count from one to ten."}],
    ]
    expected = fp32.chat_completion(dialogs, temperature=0, max_gen_len=16)
    assert default.chat_completion(dialogs, temperature=0, max_gen_len=16) == expected
