"""Checkpoint tensors: lazy safetensors views, FP8 block dequantization, and the load error type."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch


class CheckpointTensorError(ValueError):
    """A checkpoint tensor the model cannot take (unknown name, wrong shape); names the tensor so that the
    loader can add the file it came from."""

    def __init__(self, tensor: str, problem: str) -> None:
        super().__init__(f"tensor {tensor!r}: {problem}")
        self.tensor = tensor
        self.problem = problem


class LazyTensor:
    """A safetensors tensor that is read only when, and only as much as, a weight loader asks for."""

    def __init__(self, file_handle: Any, name: str) -> None:
        self._slice = file_handle.get_slice(name)
        self.name = name
        self.shape = tuple(self._slice.get_shape())
        self.dtype_name: str = self._slice.get_dtype()  # safetensors' name: F32, BF16, F8_E4M3, ...

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        index = tuple(
            slice(start, start + length) if d == dim else slice(None) for d in range(len(self.shape))
        )
        return self._slice[index]

    def load(self) -> torch.Tensor:
        return self._slice[tuple(slice(None) for _ in self.shape)] if self.shape else self._slice[:]


def dequantize_fp8_blocks(
    weight: torch.Tensor, scale_inv: torch.Tensor, block: Sequence[int], dtype: torch.dtype
) -> torch.Tensor:
    """w[i, j] = fp8[i, j] · scale_inv[i // bn, j // bk], computed in fp32 on weight's device."""
    rows, cols = weight.shape
    bn, bk = block
    expected = (math.ceil(rows / bn), math.ceil(cols / bk))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(
            f"weight_scale_inv has shape {list(scale_inv.shape)}, expected {list(expected)} for a "
            f"[{rows}, {cols}] weight in [{bn}, {bk}] blocks"
        )
    scale = scale_inv.to(weight.device, torch.float32)
    scale = scale.repeat_interleave(bn, dim=0)[:rows].repeat_interleave(bk, dim=1)[:, :cols]
    return (weight.to(torch.float32) * scale).to(dtype)
