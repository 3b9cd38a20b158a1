"""Attention backends: MHA-form prefill and absorbed-form decode over the latent cache."""

from __future__ import annotations

from typing import NamedTuple

import torch

from tpla_serve.config import ATTENTION_BACKENDS
from tpla_serve.layers.attention.base import AttentionBackend


class AttentionShape(NamedTuple):
    """What a decode kernel is specialized on: this rank's heads, its latent slice, the pool's layout, and
    the softmax scale (a kernel planned outside a CUDA graph needs it before any layer runs)."""

    num_heads: int
    ckv_dim: int  # r / g under TPLA
    rope_dim: int
    page_size: int
    dtype: torch.dtype
    sm_scale: float  # the attention layers' softmax scale


def resolve_backend_name(name: str, device: torch.device, shape: AttentionShape | None = None) -> str:
    """auto: FlashInfer's MLA kernel on GPU where it imports and supports `shape`, else our Triton kernel;
    plain torch on CPU. An explicit choice that cannot run here is an error, not a silent fallback."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose from {', '.join(ATTENTION_BACKENDS)}")
    cuda = device.type == "cuda"
    if name == "auto":
        if not cuda:
            return "torch"
        if shape is not None:
            from tpla_serve.layers.attention.flashinfer_backend import flashinfer_problem

            if flashinfer_problem(shape) is None:
                return "flashinfer"
        return "triton"
    if name in ("triton", "flashinfer") and not cuda:
        raise ValueError(f"--attention-backend {name} needs a CUDA device; use torch on CPU")
    if name == "flashinfer":
        if shape is None:
            raise ValueError("--attention-backend flashinfer needs the model's attention shape to plan its kernel")
        from tpla_serve.layers.attention.flashinfer_backend import flashinfer_problem

        problem = flashinfer_problem(shape)
        if problem is not None:
            raise ValueError(f"--attention-backend flashinfer: {problem}")
    return name


def create_attention_backend(
    name: str, device: torch.device | str = "cpu", shape: AttentionShape | None = None
) -> AttentionBackend:
    """Backends import lazily so that a missing optional kernel library only matters when asked for."""
    device = torch.device(device)
    name = resolve_backend_name(name, device, shape)
    if name == "flashinfer":
        from tpla_serve.layers.attention.flashinfer_backend import FlashInferAttentionBackend

        assert shape is not None  # resolve_backend_name checked it
        return FlashInferAttentionBackend(shape, device)
    if name == "triton":
        from tpla_serve.layers.attention.triton_backend import TritonAttentionBackend

        return TritonAttentionBackend()
    from tpla_serve.layers.attention.torch_backend import TorchAttentionBackend

    return TorchAttentionBackend()


__all__ = ["AttentionBackend", "AttentionShape", "create_attention_backend", "resolve_backend_name"]
