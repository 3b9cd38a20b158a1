"""Rotary position embedding for the decoupled RoPE part of MLA, with YaRN context extension.

The frequency and scale formulas follow DeepSeek's reference code (and transformers' port of it) operation
for operation, so that logits match bit-for-bit in fp32 where the ops allow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

ROPE_TYPES = ("default", "yarn")


@dataclass(frozen=True)
class RopeParams:
    """RoPE settings of a config: plain RoPE (`default`) or YaRN (`yarn`)."""

    rope_type: str = "default"
    theta: float = 10000.0
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None  # explicit cos/sin scale; derived from the mscales when None
    truncate: bool = True

    def __post_init__(self) -> None:
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(
                f"rope type {self.rope_type!r} is not supported; choose from {', '.join(ROPE_TYPES)}"
            )

    @property
    def cos_sin_scale(self) -> float:
        """Factor on cos/sin: YaRN's attention temperature, here mscale / mscale_all_dim."""
        if self.rope_type == "default":
            return 1.0
        if self.attention_factor is not None:
            return self.attention_factor
        if self.mscale and self.mscale_all_dim:
            return yarn_get_mscale(self.factor, self.mscale) / yarn_get_mscale(
                self.factor, self.mscale_all_dim
            )
        return yarn_get_mscale(self.factor)

    @property
    def softmax_mscale(self) -> float:
        """Extra factor on the softmax scale: mscale(factor, mscale_all_dim)², as DeepSeek defines it."""
        if self.rope_type == "default" or not self.mscale_all_dim:
            return 1.0
        m = yarn_get_mscale(self.factor, self.mscale_all_dim)
        return m * m


def yarn_get_mscale(scale: float = 1.0, mscale: float = 1.0) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def compute_inv_freq(params: RopeParams, dim: int) -> torch.Tensor:
    """Inverse frequencies [dim // 2] in fp32 for a rotary dimension `dim`, computed on the CPU so that every
    device gets the same bits."""
    pos_freqs = params.theta ** (torch.arange(0, dim, 2, dtype=torch.float, device="cpu") / dim)
    if params.rope_type == "default":
        return 1.0 / pos_freqs
    if params.original_max_position_embeddings is None:
        raise ValueError("YaRN needs original_max_position_embeddings")
    inv_freq_extrapolation = 1.0 / pos_freqs
    inv_freq_interpolation = 1.0 / (params.factor * pos_freqs)
    low, high = _yarn_correction_range(
        params.beta_fast,
        params.beta_slow,
        dim,
        params.theta,
        params.original_max_position_embeddings,
        params.truncate,
    )
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low), 0, 1)
    extrapolation_weight = 1 - ramp
    return inv_freq_interpolation * (1 - extrapolation_weight) + inv_freq_extrapolation * extrapolation_weight


def _yarn_correction_range(
    beta_fast: float, beta_slow: float, dim: int, base: float, original_max: int, truncate: bool
) -> tuple[float, float]:
    """Dimensions [low, high] between which YaRN blends interpolated and extrapolated frequencies."""

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(original_max / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, dim - 1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate x [..., d] by the tables cos = [c, c] and sin = [-s, s] [..., d] (broadcastable, from
    RotaryEmbedding.cos_sin), computed in fp32: x1·c - x2·s and x2·c + x1·s, the halves as one product each.

    Interleaved checkpoints (DeepSeek's own layout) pair dims (0,1), (2,3), ...; the others pair (i, i+d/2).
    Either way the output is in half-split layout: queries and keys are rotated alike, so their dot
    products, which are all attention ever uses, are the same as the reference's.
    """
    xf = x.float()
    if interleaved:
        xf = torch.cat([xf[..., 0::2], xf[..., 1::2]], dim=-1)
    return (xf * cos + xf.roll(x.shape[-1] // 2, dims=-1) * sin).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin for a batch of positions, computed on the fly (a few KFLOP per token, no cache to size)."""

    def __init__(
        self, dim: int, params: RopeParams, interleaved: bool, device: torch.device | str | None = None
    ) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"qk_rope_head_dim must be even, got {dim}")
        self.dim = dim
        self.interleaved = interleaved
        self.scale = params.cos_sin_scale
        self.register_buffer("inv_freq", compute_inv_freq(params, dim).to(device), persistent=False)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 tables [N, dim] for positions [N]: cos as [c, c] and sin as [-s, s], computed once per step
        for every layer's apply_rotary."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        cos, sin = freqs.cos() * self.scale, freqs.sin() * self.scale
        return torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [N, ..., dim]; cos/sin [N, dim] from cos_sin()."""
        shape = (cos.shape[0],) + (1,) * (x.dim() - 2) + (cos.shape[1],)
        return apply_rotary(x, cos.view(shape), sin.view(shape), self.interleaved)
