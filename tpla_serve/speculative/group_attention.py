"""EasySpec on one device: the N attention sublayers of a draft layer group as one batched call.

In a group all N attention sublayers take the group's input x (DESIGN §5). On one device their projections
run as batched matrix products over the N layers' stacked weights, and their attention as one backend
call over a batch N times as large: row i * B + b is request b in layer first + i, whose pages are offset
by i * P in the pool's layer-range view (`LatentKVPool.layer_range`), so the call reads and writes each
layer's own KV. The group's MLPs then run in order, as in the paper. Across ranks the same group runs one
sublayer per rank instead (`DraftModel._parallel_group`).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from tpla_serve.cache.pool import LatentKVPool
from tpla_serve.forward_batch import ForwardBatch, ForwardMode
from tpla_serve.layers.attention.base import AttentionBackend
from tpla_serve.layers.rotary import apply_rotary
from tpla_serve.models.deepseek import DeepseekDecoderLayer


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([t.detach() for t in tensors])


def group_batch(fb: ForwardBatch, n: int, num_pages: int, attn_backend: AttentionBackend) -> ForwardBatch:
    """The decode step `fb` (one token per request) repeated for n layers of a layer-range view: rows
    [i * B, (i + 1) * B) are layer i's, their pages and cache slots offset by i * num_pages pages. The
    caller sets kv_pool to the group's view. Device ops only, so a CUDA graph can hold them."""
    b, page_size = fb.batch_size, fb.kv_pool.page_size
    offsets = torch.arange(n, device=fb.page_table.device) * num_pages
    return ForwardBatch(
        mode=ForwardMode.DECODE,
        input_ids=fb.input_ids.repeat(n),
        positions=fb.positions.repeat(n),
        q_lens=[1] * (n * b),
        seq_lens=fb.seq_lens * n,
        qo_indptr=torch.arange(n * b + 1, device=fb.qo_indptr.device),
        kv_indptr=F.pad(fb.seq_lens_t.repeat(n).to(torch.int64).cumsum(0), (1, 0)),
        out_cache_loc=(fb.out_cache_loc[None] + (offsets * page_size)[:, None]).reshape(-1),
        page_table=(fb.page_table[None] + offsets[:, None, None].to(fb.page_table.dtype)).reshape(n * b, -1),
        seq_lens_t=fb.seq_lens_t.repeat(n),
        logits_indices=fb.logits_indices,
        kv_pool=fb.kv_pool,
        attn_backend=attn_backend,
    )


class GroupedAttention:
    """Layers first .. first+N-1's attention sublayers on one input, batched. Their weights are stacked
    copies (a few MB for a draft): forward() returns the N contributions A_i [N, T, hidden]."""

    def __init__(self, layers: list[DeepseekDecoderLayer], first: int, kv_pool: LatentKVPool) -> None:
        attns = [layer.self_attn for layer in layers]
        a0 = attns[0]
        if a0.layout.tp_size != 1:
            raise ValueError("batched attention sublayers run on one device (a replicated draft)")
        if any(a.o_proj.bias is not None for a in attns):
            raise ValueError("batched attention sublayers do not support an o_proj bias")
        if a0.w_uk is None or a0.w_uv is None:
            raise RuntimeError("call post_load_weights() before batching attention sublayers")
        self.n, self.first = len(layers), first
        self.pool = kv_pool.layer_range(first, self.n)
        self.heads, self.nope, self.rope, self.v_dim = a0.num_local_heads, a0.nope_dim, a0.rope_dim, a0.v_dim
        self.kv_rank, self.scale, self.interleaved = a0.kv_rank, a0.scale, a0.interleaved
        self.eps = layers[0].input_layernorm.eps
        self.latent_eps = a0.kv_a_layernorm.eps
        self.in_norm = _stack([layer.input_layernorm.weight for layer in layers]).unsqueeze(1)  # [N, 1, H]
        self.q_lora = a0.q_a_proj is not None
        first_proj = [a.q_a_proj if self.q_lora else a.q_proj for a in attns]
        # The first projection and kv_a_proj read the same normed input: one product for both.
        self.w_a = _stack([
            torch.cat([p.weight, a.kv_a_proj_with_mqa.weight]) for p, a in zip(first_proj, attns)
        ])
        self.w_a = self.w_a.transpose(1, 2)  # [N, H, q_width + r + d_rope]
        self.b_a = None
        if first_proj[0].bias is not None or a0.kv_a_proj_with_mqa.bias is not None:
            self.b_a = _stack([
                torch.cat([p.bias if p.bias is not None else p.weight.new_zeros(p.weight.shape[0]),
                           a.kv_a_proj_with_mqa.bias if a.kv_a_proj_with_mqa.bias is not None
                           else p.weight.new_zeros(a.kv_a_proj_with_mqa.weight.shape[0])])
                for p, a in zip(first_proj, attns)
            ]).unsqueeze(1)
        self.q_width = first_proj[0].weight.shape[0]
        if self.q_lora:
            self.q_a_norm = _stack([a.q_a_layernorm.weight for a in attns]).unsqueeze(1)
            self.q_a_eps = a0.q_a_layernorm.eps
            self.w_qb = _stack([a.q_b_proj.weight for a in attns]).transpose(1, 2)  # [N, Q, heads * qk]
        self.kv_norm = _stack([a.kv_a_layernorm.weight for a in attns]).unsqueeze(1)  # [N, 1, r]
        # μ (nope_scale) folded into W_UK, so one backend call serves layers of different μ.
        self.w_uk = _stack([a.w_uk * a.nope_scale for a in attns]).flatten(0, 1)  # [N * heads, nope, r]
        self.w_uv = _stack([a.w_uv for a in attns]).flatten(0, 1).transpose(1, 2)  # [N * heads, r, v]
        self.w_o = _stack([a.o_proj.weight for a in attns]).transpose(1, 2)  # [N, heads * v, H]

    def batch(self, fb: ForwardBatch, attn_backend: AttentionBackend) -> ForwardBatch:
        """This group's batch for decode step fb (prepare it once per step for every group of this size)."""
        return dataclasses.replace(
            group_batch(fb, self.n, self.pool.num_pages // self.n, attn_backend), kv_pool=self.pool
        )

    def __call__(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, gfb: ForwardBatch
    ) -> torch.Tensor:
        """A_i = attention_i(x) for the group's N layers, [N, T, hidden]; writes each layer's KV."""
        n, t, h = self.n, x.shape[0], self.heads
        normed = self.in_norm * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)
        a = torch.bmm(normed, self.w_a) if self.b_a is None else torch.baddbmm(self.b_a, normed, self.w_a)
        q, c, k_pe = a.split([self.q_width, self.kv_rank, self.rope], dim=-1)
        if self.q_lora:
            q = self.q_a_norm * F.rms_norm(q.float(), (q.shape[-1],), eps=self.q_a_eps).to(q.dtype)
            q = torch.bmm(q, self.w_qb)
        q_nope, q_pe = q.view(n, t, h, -1).split([self.nope, self.rope], dim=-1)
        q_pe = apply_rotary(q_pe, cos[:, None], sin[:, None], self.interleaved)
        k_pe = apply_rotary(k_pe, cos, sin, self.interleaved)
        cached = self.kv_norm * F.rms_norm(c.float(), (self.kv_rank,), eps=self.latent_eps).to(c.dtype)
        gfb.kv_pool.write(0, gfb.out_cache_loc, cached.reshape(n * t, -1), k_pe.reshape(n * t, -1))
        q_abs = torch.bmm(q_nope.permute(0, 2, 1, 3).reshape(n * h, t, self.nope), self.w_uk)  # [N*h, T, r]
        q_abs = q_abs.view(n, h, t, -1).transpose(1, 2).reshape(n * t, h, -1)
        o = gfb.attn_backend.decode(q_abs, q_pe.reshape(n * t, h, -1), 0, gfb, self.scale, 1.0)  # [N*T, h, r]
        o = torch.bmm(o.view(n, t, h, -1).transpose(1, 2).reshape(n * h, t, -1), self.w_uv)  # [N*h, T, v]
        o = o.view(n, h, t, self.v_dim).transpose(1, 2).reshape(n, t, h * self.v_dim)
        return torch.bmm(o, self.w_o)
