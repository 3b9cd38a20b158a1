"""Attention backends: MHA-form prefill and absorbed-form decode over the latent cache."""

from __future__ import annotations

import torch

from tpla_serve.layers.attention.base import AttentionBackend

BACKENDS = ("auto", "torch", "triton")


def resolve_backend_name(name: str, device: torch.device) -> str:
    """auto: our Triton kernel on GPU, plain torch on CPU."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose from {', '.join(BACKENDS)}")
    if name == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if name == "triton" and device.type != "cuda":
        raise ValueError("--attention-backend triton needs a CUDA device; use torch on CPU")
    return name


def create_attention_backend(name: str, device: torch.device | str = "cpu") -> AttentionBackend:
    """Backends import lazily so that a missing optional kernel library only matters when asked for."""
    name = resolve_backend_name(name, torch.device(device))
    if name == "triton":
        from tpla_serve.layers.attention.triton_backend import TritonAttentionBackend

        return TritonAttentionBackend()
    from tpla_serve.layers.attention.torch_backend import TorchAttentionBackend

    return TorchAttentionBackend()


__all__ = ["AttentionBackend", "BACKENDS", "create_attention_backend", "resolve_backend_name"]
