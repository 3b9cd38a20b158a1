"""The attention backend interface.

MLA needs two different kernels: prefill runs ordinary causal attention over expanded keys/values (MHA
form, exact), decode runs over the cached latent with absorbed queries. A backend provides both.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from tpla_serve.engine.forward_batch import ForwardBatch


class AttentionBackend(ABC):
    def prepare(self, fb: ForwardBatch) -> None:
        """Per-step metadata (kernel plans, split sizes), computed once and shared by all layers."""

    @abstractmethod
    def extend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fb: ForwardBatch, scale: float
    ) -> torch.Tensor:
        """MHA-form causal attention.

        q [N, H, Dqk] for the new tokens (rows by fb.qo_indptr); k [Nk, H, Dqk], v [Nk, H, Dv] for each
        request's whole KV, prefix then new (rows by fb.kv_indptr). New token i of a request with prefix p
        sees KV positions <= p + i. Returns [N, H, Dv].
        """

    @abstractmethod
    def decode(
        self,
        q_nope: torch.Tensor,
        q_pe: torch.Tensor,
        layer: int,
        fb: ForwardBatch,
        scale: float,
        nope_scale: float = 1.0,
    ) -> torch.Tensor:
        """Absorbed-form attention over the latent cache of `layer`.

        q_nope [N, H, ckv] absorbed queries, q_pe [N, H, d_r]; logits are
        scale * (nope_scale * q_nope·ĉ_t + q_pe·k_pe_t), causal within each request's query block.
        Returns o [N, H, ckv] = Σ_t p_t ĉ_t.
        """
