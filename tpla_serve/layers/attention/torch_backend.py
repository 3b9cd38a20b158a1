"""Reference-grade attention in plain torch: per request, fp32 softmax. Runs anywhere (CPU tests, CI)."""

from __future__ import annotations

import torch

from tpla_serve.forward_batch import ForwardBatch
from tpla_serve.layers.attention.base import AttentionBackend

_GATHER_ELEMENTS = 1 << 24  # KV elements one block of requests gathers at most (64 MiB of fp32)


class TorchAttentionBackend(AttentionBackend):
    def extend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fb: ForwardBatch, scale: float
    ) -> torch.Tensor:
        """Per request, fp32 scores against each run of its keys (views, no gather), one softmax."""
        assert fb.extend_kv is not None, "an EXTEND batch carries its KV layout"
        out = q.new_empty(q.shape[0], q.shape[1], v.shape[-1])
        q_start = 0
        for q_len, kv_len, runs in zip(fb.q_lens, fb.seq_lens, fb.extend_kv.runs):
            qi = q[q_start : q_start + q_len].transpose(0, 1).float()  # [H, q, D]
            parts = [torch.matmul(qi, k[a:b].transpose(0, 1).float().transpose(1, 2)) for a, b in runs]
            scores = (parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)).mul_(scale)  # [H, q, kv]
            scores[:, :, kv_len - q_len :].masked_fill_(fb.future_mask(q_len), float("-inf"))
            probs = torch.softmax(scores, dim=-1)
            o, key = None, 0
            for a, b in runs:
                part = torch.matmul(probs[:, :, key : key + b - a], v[a:b].transpose(0, 1).float())
                o = part if o is None else o.add_(part)
                key += b - a
            assert o is not None
            out[q_start : q_start + q_len] = o.transpose(0, 1).to(out.dtype)
            q_start += q_len
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
        if all(q == fb.q_lens[0] for q in fb.q_lens):
            return self._decode_uniform(q_nope, q_pe, layer, fb, scale, nope_scale)
        out = q_nope.new_empty(q_nope.shape)
        q_start = 0
        for i, q_len in enumerate(fb.q_lens):
            slots = fb.kv_indices[fb.kv_indptr[i] : fb.kv_indptr[i + 1]]
            ckv, kpe = fb.kv_pool.read(layer, slots)
            qn = q_nope[q_start : q_start + q_len].float()  # [q, H, ckv]
            qp = q_pe[q_start : q_start + q_len].float()
            scores = nope_scale * torch.einsum("qhc,tc->hqt", qn, ckv.float())
            scores = (scores + torch.einsum("qhr,tr->hqt", qp, kpe.float())) * scale
            scores.masked_fill_(~fb.causal_mask(i), float("-inf"))
            probs = torch.softmax(scores, dim=-1)
            out[q_start : q_start + q_len] = torch.einsum("hqt,tc->qhc", probs, ckv.float()).to(out.dtype)
            q_start += q_len
        return out

    @staticmethod
    def _decode_uniform(
        q_nope: torch.Tensor,
        q_pe: torch.Tensor,
        layer: int,
        fb: ForwardBatch,
        scale: float,
        nope_scale: float,
    ) -> torch.Tensor:
        """The same number q of queries per request (one per decode step; k + 1 in a speculative block): the
        batch's KV gathered into [B, L_max] blocks, query j of a request seeing its first seq_len - q + j + 1
        keys (padding masked), a few batched matrix products instead of a loop over requests; blocks of
        requests bound the memory."""
        pool = fb.kv_pool
        q = fb.q_lens[0]
        heads = q_nope.shape[1]
        out = q_nope.new_empty(q_nope.shape)
        all_slots, _ = fb.padded_kv
        length = all_slots.shape[1]
        keys = torch.arange(length, device=all_slots.device)
        ends = fb.seq_lens_t[:, None].long() - q + 1 + torch.arange(q, device=all_slots.device)  # [B, q]
        rows = max(1, _GATHER_ELEMENTS // (length * (pool.ckv_dim + pool.rope_dim)))
        ckv_all, kpe_all = pool.ckv[layer].view(-1, pool.ckv_dim), pool.kpe[layer].view(-1, pool.rope_dim)
        qn_all = q_nope.reshape(fb.batch_size, q * heads, -1)
        qp_all = q_pe.reshape(fb.batch_size, q * heads, -1)
        for b0 in range(0, fb.batch_size, rows):
            b1 = min(fb.batch_size, b0 + rows)
            flat = all_slots[b0:b1].reshape(-1)
            ckv = ckv_all.index_select(0, flat).view(b1 - b0, -1, pool.ckv_dim).float()  # [b, L, c]
            kpe = kpe_all.index_select(0, flat).view(b1 - b0, -1, pool.rope_dim).float()  # [b, L, r]
            scores = nope_scale * torch.bmm(qn_all[b0:b1].float(), ckv.transpose(1, 2))
            scores = (scores + torch.bmm(qp_all[b0:b1].float(), kpe.transpose(1, 2))) * scale  # [b, q*H, L]
            visible = keys[None, None, :] < ends[b0:b1, :, None]  # [b, q, L]
            scores = scores.view(b1 - b0, q, heads, length)
            scores.masked_fill_(~visible[:, :, None, :], float("-inf"))
            probs = torch.softmax(scores.view(b1 - b0, q * heads, length), dim=-1)
            out[b0 * q : b1 * q] = torch.bmm(probs, ckv).view(-1, heads, pool.ckv_dim).to(out.dtype)
        return out
