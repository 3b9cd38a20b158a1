"""Reference-grade attention in plain torch: per request, fp32 softmax. Runs anywhere (CPU tests, CI)."""

from __future__ import annotations

import torch

from tpla_serve.forward_batch import ForwardBatch
from tpla_serve.layers.attention.base import AttentionBackend


def causal_mask(q_len: int, kv_len: int, device: torch.device) -> torch.Tensor:
    """True where query i (the last q_len of kv_len positions) may see key j."""
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    k_pos = torch.arange(kv_len, device=device)[None, :]
    return k_pos <= q_pos


class TorchAttentionBackend(AttentionBackend):
    def extend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fb: ForwardBatch, scale: float
    ) -> torch.Tensor:
        out = q.new_empty(q.shape[0], q.shape[1], v.shape[-1])
        q_start = k_start = 0
        for q_len, kv_len in zip(fb.q_lens, fb.seq_lens):
            qi = q[q_start : q_start + q_len].transpose(0, 1).float()  # [H, q, D]
            ki = k[k_start : k_start + kv_len].transpose(0, 1).float()
            vi = v[k_start : k_start + kv_len].transpose(0, 1).float()
            scores = torch.matmul(qi, ki.transpose(1, 2)) * scale
            scores.masked_fill_(~causal_mask(q_len, kv_len, q.device), float("-inf"))
            probs = torch.softmax(scores, dim=-1)
            out[q_start : q_start + q_len] = torch.matmul(probs, vi).transpose(0, 1).to(out.dtype)
            q_start += q_len
            k_start += kv_len
        return out

    def decode(
        self,
        q_nope: torch.Tensor,
        q_pe: torch.Tensor,
        layer: int,
        fb: ForwardBatch,
        scale: float,
        nope_scale: float = 1.0,
    ) -> torch.Tensor:
        out = q_nope.new_empty(q_nope.shape)
        q_start = 0
        for i, (q_len, kv_len) in enumerate(zip(fb.q_lens, fb.seq_lens)):
            slots = fb.kv_indices[fb.kv_indptr[i] : fb.kv_indptr[i + 1]]
            ckv, kpe = fb.kv_pool.read(layer, slots)
            qn = q_nope[q_start : q_start + q_len].float()  # [q, H, ckv]
            qp = q_pe[q_start : q_start + q_len].float()
            scores = nope_scale * torch.einsum("qhc,tc->hqt", qn, ckv.float())
            scores = (scores + torch.einsum("qhr,tr->hqt", qp, kpe.float())) * scale
            scores.masked_fill_(~causal_mask(q_len, kv_len, q_nope.device), float("-inf"))
            probs = torch.softmax(scores, dim=-1)
            out[q_start : q_start + q_len] = torch.einsum("hqt,tc->qhc", probs, ckv.float()).to(out.dtype)
            q_start += q_len
        return out
