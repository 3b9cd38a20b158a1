"""GPU backend: our Triton paged MLA/TPLA flash-decoding kernel; SDPA for the MHA-form prefill."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tpla_serve.engine.forward_batch import ForwardBatch
from tpla_serve.layers.attention.base import AttentionBackend
from tpla_serve.layers.attention.torch_backend import causal_mask


def sdpa_extend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fb: ForwardBatch, scale: float) -> torch.Tensor:
    """Per request, torch's fused SDPA; a prefix makes the causal mask a bottom-right-aligned one."""
    out = q.new_empty(q.shape[0], q.shape[1], v.shape[-1])
    q_start = k_start = 0
    for q_len, kv_len in zip(fb.q_lens, fb.seq_lens):
        qi = q[q_start : q_start + q_len].transpose(0, 1)
        ki = k[k_start : k_start + kv_len].transpose(0, 1)
        vi = v[k_start : k_start + kv_len].transpose(0, 1)
        if q_len == kv_len:
            o = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=scale)
        else:
            mask = causal_mask(q_len, kv_len, q.device)
            o = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=scale)
        out[q_start : q_start + q_len] = o.transpose(0, 1)
        q_start += q_len
        k_start += kv_len
    return out


class TritonAttentionBackend(AttentionBackend):
    def __init__(self) -> None:
        from tpla_kernels.decode import mla_decode  # imports Triton: only where this backend is chosen

        self._mla_decode = mla_decode

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
        q_len = fb.q_lens[0]
        if any(n != q_len for n in fb.q_lens):
            raise ValueError(f"the Triton decode kernel needs one q_len per batch, got {sorted(set(fb.q_lens))}")
        n, heads, ckv = q_nope.shape
        batch = n // q_len
        out, _ = self._mla_decode(
            q_nope.reshape(batch, q_len * heads, ckv),
            q_pe.reshape(batch, q_len * heads, -1),
            fb.kv_pool.ckv[layer],
            fb.kv_pool.kpe[layer],
            fb.page_table,
            fb.seq_lens_t,
            scale,
            q_len=q_len,
            nope_scale=nope_scale,
        )
        return out.view(n, heads, ckv)
