"""The attention backend interface.

MLA needs two different kernels: prefill runs ordinary causal attention over expanded keys/values (MHA
form, exact), decode runs over the cached latent with absorbed queries. A backend provides both.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Hashable
from typing import TYPE_CHECKING, ClassVar

import torch

if TYPE_CHECKING:
    from tpla_serve.forward_batch import ForwardBatch


class AttentionBackend(ABC):
    capturable: ClassVar[bool] = False
    """Whether a decode step of one token per request can be captured in a CUDA graph: once
    prepare_graph() has run, decode() launches by shape and reads the step from fixed addresses only."""
    graph_query_blocks: ClassVar[bool] = False
    """Whether a captured decode step may have q_len > 1 queries per request, causal within each request's
    block (speculative verification and calibration), besides one token per request."""
    graphs_per_table_width: ClassVar[bool] = True
    """Whether the captured launch depends on the page table's width (a kernel that sizes its KV splits by
    it): then graphs are captured per width bucket, else once at the full width."""

    def prepare(self, fb: ForwardBatch) -> None:
        """Per-step metadata (kernel plans, split sizes), computed once and shared by all layers."""

    def prepare_graph(self, key: Hashable, fb: ForwardBatch) -> None:
        """Plan the captured decode graph `key` for the step in `fb`, outside the graph: before it is
        captured and again before each replay, because a graph replays kernels, not host-side planning.

        fb's device tensors are the graph's static buffers, already holding the step; its host q_lens and
        seq_lens are the step's lengths, padding rows included (one token each). What is planned for one
        key must live at addresses of its own: the key's graph reads them on every replay. A backend whose
        decode reads nothing but fb's device tensors needs nothing here.
        """

    @abstractmethod
    def extend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fb: ForwardBatch, scale: float
    ) -> torch.Tensor:
        """MHA-form causal attention.

        q [N, H, Dqk] for the new tokens (rows by fb.qo_indptr); k [U, H, Dqk], v [U, H, Dv] the step's
        distinct KV rows, request i's keys (prefix then new) being the rows of fb.extend_kv.runs[i] in
        order. New token i of a request with prefix p sees KV positions <= p + i. Returns [N, H, Dv].
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
