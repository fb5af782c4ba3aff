"""Rotary position embeddings in Meta's layout (adjacent pairs rotate together), with Llama 3.1 frequency scaling."""

from __future__ import annotations

import math

import torch

from lamina.model.config import RopeScaling


def inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None, device=None) -> torch.Tensor:
    """The head_dim/2 rotation frequencies (radians per position), float32, scaled as Llama 3.1 does when asked."""
    exponents = torch.arange(0, head_dim, 2, device=device)[: head_dim // 2].float() / head_dim
    freqs = 1.0 / (theta**exponents)
    if scaling is None:
        return freqs
    wavelen = 2 * math.pi / freqs
    low_freq_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_freq_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    # Between the two wavelengths, blend the kept and the divided frequency linearly in context/wavelength.
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    blended = (1 - smooth) * freqs / scaling.factor + smooth * freqs
    scaled = torch.where(wavelen > low_freq_wavelen, freqs / scaling.factor, freqs)
    in_band = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(in_band, blended, scaled)


def rotation(inv_freq: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position * frequency: [N] positions -> two [N, 1, head_dim/2] float32 tensors
    (the 1 broadcasts over heads)."""
    angles = torch.outer(positions.to(torch.float32), inv_freq)
    return angles.cos().unsqueeze(1), angles.sin().unsqueeze(1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each adjacent pair (x[2i], x[2i+1]) of x [N, H, D] by its angle, in float32; returns x's dtype."""
    pairs = x.float().unflatten(-1, (-1, 2))  # [N, H, D/2, 2]
    x0, x1 = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)
