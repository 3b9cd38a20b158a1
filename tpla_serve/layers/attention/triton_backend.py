"""GPU backend: our Triton paged MLA/TPLA flash-decoding kernel; SDPA for the MHA-form prefill."""

from __future__ import annotations

from typing import NamedTuple

import torch

from tpla_serve.forward_batch import ForwardBatch
from tpla_serve.layers.attention.base import AttentionBackend
from tpla_serve.layers.attention.sdpa_extend import sdpa_extend


class RaggedRows(NamedTuple):
    """Where a DECODE step's N query rows sit when each request's block is padded at the front to q_max.

    The kernel's causal rule (query i of a q_max block sees keys < seq_len - q_max + i + 1) then holds for
    the real rows, the last q_len of each block; padding rows see fewer (possibly no) keys and are dropped.
    """

    q_lens: list[int]
    q_max: int
    rows: torch.Tensor  # [N] int64 on the device: row of each real query in the [B * q_max] padded layout


def ragged_rows(q_lens: list[int], device: torch.device | str) -> RaggedRows:
    q_max = max(q_lens)
    rows = [b * q_max + q_max - n + j for b, n in enumerate(q_lens) for j in range(n)]
    return RaggedRows(q_lens, q_max, torch.tensor(rows, dtype=torch.int64).to(device, non_blocking=True))


class TritonAttentionBackend(AttentionBackend):
    capturable = True  # the kernel reads the page table and lengths on the device and sizes its grid by shape
    graph_query_blocks = True  # q_len queries per request are a shape like any other

    def __init__(self) -> None:
        from tpla_kernels.decode import mla_decode  # imports Triton: only where this backend is chosen

        self._mla_decode = mla_decode
        self._ragged: RaggedRows | None = None  # the current step's layout, when its q_lens differ

    def prepare(self, fb: ForwardBatch) -> None:
        uniform = all(n == fb.q_lens[0] for n in fb.q_lens)
        self._ragged = None if uniform else ragged_rows(fb.q_lens, fb.input_ids.device)

    def extend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fb: ForwardBatch, scale: float
    ) -> torch.Tensor:
        return sdpa_extend(q, k, v, fb, scale)

    def decode(
        self,
        q_nope: torch.Tensor,
        q_pe: torch.Tensor,
        layer: int,
        fb: ForwardBatch,
        scale: float,
        nope_scale: float = 1.0,
    ) -> torch.Tensor:
        _, heads, ckv = q_nope.shape
        batch = fb.batch_size
        ragged: RaggedRows | None = None
        q_len, qn, qp = fb.q_lens[0], q_nope, q_pe
        if any(q != q_len for q in fb.q_lens):
            ragged = self._ragged
            if ragged is None or ragged.q_lens is not fb.q_lens:  # prepare() was not run for this step
                ragged = self._ragged = ragged_rows(fb.q_lens, q_nope.device)
            q_len = ragged.q_max
            qn = q_nope.new_zeros(batch * q_len, heads, ckv).index_copy_(0, ragged.rows, q_nope)
            qp = q_pe.new_zeros(batch * q_len, heads, q_pe.shape[-1]).index_copy_(0, ragged.rows, q_pe)
        out, _ = self._mla_decode(
            qn.reshape(batch, q_len * heads, ckv),
            qp.reshape(batch, q_len * heads, -1),
            fb.kv_pool.ckv[layer],
            fb.kv_pool.kpe[layer],
            fb.page_table,
            fb.seq_lens_t,
            scale,
            q_len=q_len,
            nope_scale=nope_scale,
        )
        out = out.view(batch * q_len, heads, ckv)
        return out if ragged is None else out.index_select(0, ragged.rows)
