"""Weight-only quantization: the transforms, the layers against a float reference, GGUF 4-bit weights carried over
exactly, and the quality cost on the default model (perplexity of a held passage within 1% of float32 for int8 and
5% for int4, as the performance issue asks)."""

import math

import pytest
import torch
import torch.nn.functional as F

import lamina
from lamina import ConfigError
from lamina.quant import Int4Linear, Int8Linear, quantize_int4_grouped, quantize_int8_per_channel, quantize_model

PASSAGE = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named after the "
    "engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889. Locally nicknamed "
    '"La dame de fer" (French for "Iron Lady"), it was constructed as the centrepiece of the 1889 World\'s Fair, and '
    "to crown the centennial anniversary of the French Revolution. Although initially criticised by some of France's "
    "leading artists and intellectuals for its design, it has since become a global cultural icon of France."
)


def test_per_channel_round_trip():
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.01, 3, 64)[:, None]
    q, scales = quantize_int8_per_channel(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    assert ((q.float() * scales[:, None] - w).abs() <= scales[:, None] / 2 + 1e-6).all()


def test_layer_equals_float_matmul_of_the_dequantized_weight():
    gen = torch.Generator().manual_seed(1)
    w, x = torch.randn(48, 80, generator=gen), torch.randn(3, 5, 80, generator=gen)
    layer = Int8Linear(w)
    q, scales = quantize_int8_per_channel(w)
    expected = F.linear(x, q.float() * scales[:, None])
    out = layer(x)
    assert out.shape == (3, 5, 48) and out.dtype == x.dtype
    # The CPU kernel takes bfloat16 activations: relative error of bfloat16 (8 bits of mantissa).
    torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())


def test_int4_groups_round_trip_and_layer():
    gen = torch.Generator().manual_seed(2)
    w, x = torch.randn(48, 96, generator=gen), torch.randn(4, 96, generator=gen)
    q, scales, zeros = quantize_int4_grouped(w, 32)
    assert q.min() >= 0 and q.max() <= 15
    deq = ((q.reshape(48, 3, 32) - 8) * scales[..., None] + zeros[..., None]).reshape(48, 96)
    assert ((deq - w).abs() <= scales.repeat_interleave(32, dim=1) / 2 + 1e-6).all()
    expected = F.linear(x, deq)
    out = Int4Linear(q, scales, zeros, 32)(x)
    torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())


def test_gguf_q4_weights_carry_over_exactly(tmp_path):

    from lamina.weights import load_gguf
    from lamina.weights.gguf import gguf_int4_groups

    from ..weights.test_gguf import _write_llama_gguf

    path = tmp_path / "q4.gguf"
    _write_llama_gguf(path, qtypes=("Q4_1", "Q4_0"))
    _, state, _ = load_gguf(path)
    groups = gguf_int4_groups(path)
    assert "layers.0.attention.wq.weight" in groups and "layers.1.feed_forward.w2.weight" in groups
    for name, (q, scales, zeros) in groups.items():
        N, K = q.shape
        deq = ((q.reshape(N, K // 32, 32) - 8) * scales[..., None] + zeros[..., None]).reshape(N, K)
        torch.testing.assert_close(deq, state[name], rtol=1e-6, atol=1e-6)  # the gguf package's dequantization


@pytest.fixture(scope="module")
def pair():
    fp32 = lamina.load(device="cpu", dtype="float32", max_seq_len=512)
    int8 = lamina.load(device="cpu", dtype="float32", max_seq_len=512, quantize="int8")
    return fp32, int8


def test_int4_perplexity_within_five_percent_of_float32(pair):
    fp32, _ = pair
    int4 = lamina.load(device="cpu", dtype="float32", max_seq_len=512, quantize="int4")
    assert sum(isinstance(m, Int4Linear) for m in int4.model.modules()) == 7 * 30
    assert isinstance(int4.model.output, Int8Linear)  # the tied output projection: Q8_0 in the file
    ids = fp32.tokenizer.encode(PASSAGE, bos=fp32.tokenizer.add_bos, eos=False)
    assert abs(_perplexity(int4, ids) / _perplexity(fp32, ids) - 1) < 0.05


def _perplexity(llama, ids):
    (_,), (lps,) = llama.generate([ids], 0, logprobs=True, echo=True)
    return math.exp(-sum(lps[1:]) / (len(lps) - 1))


def test_perplexity_within_one_percent_of_float32(pair):
    fp32, int8 = pair
    ids = fp32.tokenizer.encode(PASSAGE, bos=fp32.tokenizer.add_bos, eos=False)
    assert sum(isinstance(m, Int8Linear) for m in int8.model.modules()) == 7 * 30 + 1
    base, quantized = _perplexity(fp32, ids), _perplexity(int8, ids)
    assert abs(quantized / base - 1) < 0.01


def test_low_entropy_greedy_starts_the_same(pair):
    fp32, int8 = pair
    dialog = [{"role": "user", "content": "What is the capital of France?"}]
    (a,) = fp32.chat_completion([dialog], temperature=0, max_gen_len=6)
    (b,) = int8.chat_completion([dialog], temperature=0, max_gen_len=6)
    assert a == b


def test_unknown_mode():
    with pytest.raises(ConfigError, match="unknown quantization 'int3'"):
        lamina.load(quantize="int3")
    model = torch.nn.Module()
    with pytest.raises(ConfigError, match="unknown quantization"):
        quantize_model(model, "fp4")
