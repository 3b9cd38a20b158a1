"""Gated activations."""

from __future__ import annotations

import torch
import torch.nn.functional as F

SUPPORTED_ACTIVATIONS = ("silu",)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU on a fused [..., 2I] gate|up projection: silu(gate) * up."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
