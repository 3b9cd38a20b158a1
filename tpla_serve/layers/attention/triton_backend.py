"""GPU backend: our Triton paged MLA/TPLA flash-decoding kernel; SDPA for the MHA-form prefill."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from tpla_serve.forward_batch import ForwardBatch
from tpla_serve.layers.attention.base import AttentionBackend


def sdpa_extend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fb: ForwardBatch, scale: float) -> torch.Tensor:
    """Per request, torch's fused SDPA over its key runs (a cached prefix's and its own, concatenated);
    a prefix makes the causal mask a bottom-right-aligned one."""
    assert fb.extend_kv is not None, "an EXTEND batch carries its KV layout"
    out = q.new_empty(q.shape[0], q.shape[1], v.shape[-1])
    q_start = 0
    for i, (q_len, kv_len, runs) in enumerate(zip(fb.q_lens, fb.seq_lens, fb.extend_kv.runs)):
        qi = q[q_start : q_start + q_len].transpose(0, 1)
        ki, vi = (torch.cat([t[a:b] for a, b in runs]) if len(runs) > 1 else t[runs[0][0] : runs[0][1]]
                  for t in (k, v))
        ki, vi = ki.transpose(0, 1), vi.transpose(0, 1)
        if q_len == kv_len:
            o = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=scale)
        else:
            o = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=fb.causal_mask(i), scale=scale)
        out[q_start : q_start + q_len] = o.transpose(0, 1)
        q_start += q_len
    return out


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
