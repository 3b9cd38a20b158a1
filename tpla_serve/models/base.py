"""What the engine relies on from a model: the small surface the runner, CUDA graphs and the draft use.

A model is a stack of decoder layers over a residual stream. The runner calls it whole; EasySpec's
layer-parallel drafting (DESIGN §5) drives the stack itself, one sublayer at a time, so a layer exposes
its attention and feed-forward contributions separately.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from tpla_serve.forward_batch import ForwardBatch
from tpla_serve.models.config import ModelConfig


class AttentionLayer(Protocol):
    num_local_heads: int  # heads this rank serves
    scale: float  # the softmax scale of the layer's logits


class DecoderLayer(Protocol):
    self_attn: AttentionLayer

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, fb: ForwardBatch) -> torch.Tensor:
        """x + attention(x); then + feed_forward of that."""
        ...

    def attention(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, fb: ForwardBatch) -> torch.Tensor:
        """The attention sublayer's contribution to the residual stream (writes the layer's KV)."""
        ...

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The MLP sublayer's contribution to the residual stream."""
        ...


class CausalLM(Protocol):
    config: ModelConfig
    fingerprint: str  # names the checkpoint's weights (set by the loader)

    @property
    def layers(self) -> Sequence[DecoderLayer]: ...

    def __call__(self, fb: ForwardBatch) -> torch.Tensor:
        """fp32 logits of the rows fb.logits_indices names."""
        ...

    def embed(self, fb: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(the residual stream's start [N, hidden], rotary cos, rotary sin) of the step's N new tokens."""
        ...

    def logits(self, x: torch.Tensor, fb: ForwardBatch) -> torch.Tensor:
        """fp32 logits of the rows fb.logits_indices names, from the last layer's residual stream x."""
        ...

    def cuda_graph_problem(self) -> str | None:
        """Why a decode step of this model cannot be captured in a CUDA graph, or None."""
        ...
