"""Rotary embeddings against Meta's precompute_freqs_cis / apply_scaling / apply_rotary_emb."""

import torch
from llama_models.llama3 import model as ref

from lamina.model import RopeScaling
from lamina.model.rope import apply_rotary, inverse_frequencies, rotation


def test_scaled_frequencies_equal_reference():
    for head_dim in (64, 128):
        base = 1.0 / (500000.0 ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
        ours = inverse_frequencies(head_dim, 500000.0, RopeScaling(factor=8.0))
        torch.testing.assert_close(ours, ref.apply_scaling(base), rtol=0, atol=0)
        torch.testing.assert_close(inverse_frequencies(head_dim, 500000.0, None), base, rtol=0, atol=0)


def test_rotation_equals_reference_at_long_positions():
    head_dim, positions = 128, torch.arange(0, 20000, 7)
    freqs_cis = ref.precompute_freqs_cis(head_dim, 20000, 500000.0, use_scaled=True)[positions]
    cos, sin = rotation(inverse_frequencies(head_dim, 500000.0, RopeScaling()), positions)
    torch.testing.assert_close(cos[:, 0], freqs_cis.real, rtol=0, atol=1e-6)
    torch.testing.assert_close(sin[:, 0], freqs_cis.imag, rtol=0, atol=1e-6)

    q, k = torch.randn(1, len(positions), 4, head_dim), torch.randn(1, len(positions), 2, head_dim)
    ref_q, ref_k = ref.apply_rotary_emb(q, k, freqs_cis)
    torch.testing.assert_close(apply_rotary(q[0], cos, sin), ref_q[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(apply_rotary(k[0], cos, sin), ref_k[0], rtol=1e-5, atol=1e-5)


def test_scaling_factor_is_a_parameter():
    # Llama 3.2 1B/3B use factor 32: wavelengths beyond the low-frequency cutoff are divided by it, short ones kept.
    base = inverse_frequencies(64, 500000.0, None)
    f8 = inverse_frequencies(64, 500000.0, RopeScaling(factor=8.0))
    f32 = inverse_frequencies(64, 500000.0, RopeScaling(factor=32.0))
    wavelen = 2 * torch.pi / base
    long, short = wavelen > 8192, wavelen < 8192 / 4
    torch.testing.assert_close(f32[long], base[long] / 32)
    torch.testing.assert_close(f8[long], base[long] / 8)
    assert torch.equal(f32[short], base[short])
    assert long.any() and short.any()
