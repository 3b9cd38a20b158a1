"""Attention backends: MHA-form prefill and absorbed-form decode over the latent cache."""

from __future__ import annotations

from tpla_serve.layers.attention.base import AttentionBackend

BACKENDS = ("torch",)


def create_attention_backend(name: str) -> AttentionBackend:
    """Backends import lazily so that a missing optional kernel library only matters when asked for."""
    if name == "torch":
        from tpla_serve.layers.attention.torch_backend import TorchAttentionBackend

        return TorchAttentionBackend()
    raise ValueError(f"unknown attention backend {name!r}; choose from {', '.join(BACKENDS)}")


__all__ = ["AttentionBackend", "BACKENDS", "create_attention_backend"]
