"""Rotary position embeddings: frequencies (with context-extension scaling), cos/sin tables, rotation.

Two layouts exist in released checkpoints. Llama, Qwen, Gemma, OLMo rotate dimension i together with
i + d/2 (the two halves); GLM-4 rotates adjacent pairs (2i, 2i + 1). With a rotary fraction < 1 (GLM-4: 0.5)
only the first `rotary_dim` dimensions of each head are rotated and the rest pass through unchanged.
"""

from __future__ import annotations

import math

import torch

from forge_lm.trainer import kernels
from forge_lm.trainer.model.config import RopeScalingConfig


def rope_frequencies(
    rotary_dim: int,
    theta: float,
    scaling: RopeScalingConfig | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The inverse frequencies theta^(-2i/rotary_dim), i = 0 .. rotary_dim/2 - 1, in float32, then scaled.

    Always float32: in bf16 the high frequencies would be rounded enough to scramble positions.
    """
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float32, device=device) / rotary_dim
    inv_freq = 1.0 / (theta**exponents)
    if scaling is None or scaling.kind == "none":
        return inv_freq
    if scaling.kind == "linear":  # positions / factor, i.e. every frequency / factor
        return inv_freq / scaling.factor
    return _llama3_scaling(inv_freq, scaling)


def _llama3_scaling(inv_freq: torch.Tensor, s: RopeScalingConfig) -> torch.Tensor:
    """Llama 3.1's frequency-dependent stretch.

    Wavelengths longer than original/low_freq_factor (the slow dimensions, which never completed a turn during
    pre-training) are divided by `factor`; those shorter than original/high_freq_factor (the fast, local ones)
    are kept; in between, the two are blended linearly in original / wavelength.
    """
    wavelen = 2 * math.pi / inv_freq
    long_wavelen = s.original_max_seq_len / s.low_freq_factor
    short_wavelen = s.original_max_seq_len / s.high_freq_factor
    blend = (s.original_max_seq_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    blended = (1 - blend) * inv_freq / s.factor + blend * inv_freq
    out = torch.where(wavelen > long_wavelen, inv_freq / s.factor, blended)
    return torch.where(wavelen < short_wavelen, inv_freq, out)


def rope_cos_sin(
    inv_freq: torch.Tensor, position_ids: torch.Tensor, dtype: torch.dtype, interleaved: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position * frequency, each [B, T, rotary_dim], computed in fp32 and cast to `dtype`.

    Each angle is used for a pair of dimensions: duplicated as two halves (cat) for the half layout, or
    repeated in place for the interleaved layout.
    """
    angles = position_ids[..., None].float() * inv_freq.float()  # [B, T, rotary_dim/2]
    if interleaved:
        angles = angles.repeat_interleave(2, dim=-1)
    else:
        angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False
) -> torch.Tensor:
    """Rotate x [B, H, T, head_dim] by its positions; cos/sin are [B, T, rotary_dim] (rotary_dim <= head_dim)."""
    return kernels.apply_rotary(x, cos, sin, interleaved)  # fused on CUDA, else the plain rotation
