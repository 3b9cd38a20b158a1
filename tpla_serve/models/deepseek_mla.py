"""DeepSeek's multi-head latent attention (MLA) for one rank's heads, TPLA-sharded (DESIGN §2, §3).

Every call first writes the new tokens' (ĉ, k_pe) into the paged pool; prompt tokens (EXTEND) then run
exact attention in MHA form over keys/values expanded from the latent, generated tokens (DECODE) the
absorbed form directly on the cached latent slice.
"""

from __future__ import annotations

import torch
from torch import nn

from tpla_serve.forward_batch import ForwardBatch, ForwardMode
from tpla_serve.layers.linear import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear, tp_all_gather
from tpla_serve.layers.norm import RMSNorm
from tpla_serve.layers.rotary import apply_rotary
from tpla_serve.models.config import ModelConfig
from tpla_serve.tpla.layout import ShardLayout
from tpla_serve.tpla.options import TPLAOptions

# DeepSeek's reference code builds the q/kv latent norms with the class default eps, not rms_norm_eps.
LATENT_NORM_EPS = 1e-6


class DeepseekAttention(nn.Module):
    """Multi-head latent attention for this rank's heads (DESIGN §2 notation), TPLA-sharded (DESIGN §3).

    The rank computes the full latent c (kv_a_proj is replicated), caches only its group's slice
    [lat0, lat1) of ĉ plus the full k_pe, and decodes over that slice with its own softmax and logit scale
    μ (nope_scale); o_proj's all-reduce sums the groups' partial outputs. Prompt tokens (pd-sep) run exact
    MLA: each rank takes 1/g of its heads and expands the full latent, gathered from the groups when a
    prefix is already cached. With g = 1 all of this is plain MLA-TP.
    """

    def __init__(
        self,
        config: ModelConfig,
        layer_id: int,
        layout: ShardLayout,
        dtype: torch.dtype,
        tpla: TPLAOptions = TPLAOptions(),
    ) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.layout = layout
        self.tpla = tpla
        self.lat0, self.lat1 = layout.latent_slice(config.kv_lora_rank)
        self.nope_scale = 1.0  # μ of this rank's group; set from a calibration file
        self.interleaved = config.rope_interleave
        self.nope_dim = config.qk_nope_head_dim
        self.rope_dim = config.qk_rope_head_dim
        self.v_dim = config.v_head_dim
        self.kv_rank = config.kv_lora_rank
        self.scale = config.softmax_scale
        h0, h1 = layout.head_range(config.num_attention_heads)
        self.num_local_heads = h1 - h0
        if self.num_local_heads % layout.latent_groups:
            raise ValueError(
                f"num_attention_heads ({config.num_attention_heads}) must be divisible by tp_size "
                f"({layout.tp_size}) for exact prefill across {layout.latent_groups} latent groups"
            )
        per_group = self.num_local_heads // layout.latent_groups
        self.prefill_heads = (layout.group * per_group, (layout.group + 1) * per_group)  # local indices
        num_heads, hidden, qk = config.num_attention_heads, config.hidden_size, config.qk_head_dim
        kv_dim = self.nope_dim + self.v_dim

        self.q_proj: ColumnParallelLinear | None = None
        self.q_a_proj: ReplicatedLinear | None = None
        self.q_a_layernorm: RMSNorm | None = None
        self.q_b_proj: ColumnParallelLinear | None = None
        if config.q_lora_rank is None:
            self.q_proj = ColumnParallelLinear(
                hidden, num_heads * qk, layout, dtype=dtype, out_range=(h0 * qk, h1 * qk)
            )
        else:
            self.q_a_proj = ReplicatedLinear(
                hidden, config.q_lora_rank, bias=config.attention_bias, dtype=dtype
            )
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, LATENT_NORM_EPS, dtype=dtype)
            self.q_b_proj = ColumnParallelLinear(
                config.q_lora_rank, num_heads * qk, layout, dtype=dtype, out_range=(h0 * qk, h1 * qk)
            )
        self.kv_a_proj_with_mqa = ReplicatedLinear(
            hidden, self.kv_rank + self.rope_dim, bias=config.attention_bias, dtype=dtype
        )
        self.kv_a_layernorm = RMSNorm(self.kv_rank, LATENT_NORM_EPS, dtype=dtype)
        self.kv_b_proj = ColumnParallelLinear(
            self.kv_rank, num_heads * kv_dim, layout, dtype=dtype, out_range=(h0 * kv_dim, h1 * kv_dim)
        )
        self.o_proj = RowParallelLinear(
            num_heads * self.v_dim,
            hidden,
            layout,
            bias=config.attention_bias,
            dtype=dtype,
            in_range=(h0 * self.v_dim, h1 * self.v_dim),
        )
        # W_UK [H, d_nope, r] and W_UV [H, d_v, r], split out of kv_b_proj by post_load_weights().
        self.register_buffer("w_uk", None, persistent=False)
        self.register_buffer("w_uv", None, persistent=False)

    def post_load_weights(self) -> None:
        w = self.kv_b_proj.weight.view(self.num_local_heads, self.nope_dim + self.v_dim, self.kv_rank)
        self.w_uk = w[:, : self.nope_dim, self.lat0 : self.lat1].contiguous()
        self.w_uv = w[:, self.nope_dim :, self.lat0 : self.lat1].contiguous()

    def _latent_for_cache(self, c: torch.Tensor, exact: bool) -> torch.Tensor:
        """This rank's slice of ĉ: of the globally normalized latent, or (local norm) normalized alone."""
        if exact or self.tpla.norm == "exact":
            return self.kv_a_layernorm(c)[:, self.lat0 : self.lat1]
        part = c[:, self.lat0 : self.lat1]
        pf = part.float()
        pf = pf * torch.rsqrt(pf.pow(2).mean(-1, keepdim=True) + self.kv_a_layernorm.eps)
        return self.kv_a_layernorm.weight[self.lat0 : self.lat1] * pf.to(part.dtype)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, fb: ForwardBatch
    ) -> torch.Tensor:
        n = x.shape[0]
        if self.q_proj is not None:
            q = self.q_proj(x)
        else:
            assert self.q_a_proj is not None and self.q_a_layernorm is not None and self.q_b_proj is not None
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_pe = q.view(n, self.num_local_heads, -1).split([self.nope_dim, self.rope_dim], dim=-1)
        c, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_rank, self.rope_dim], dim=-1)
        q_pe = apply_rotary(q_pe, cos[:, None], sin[:, None], self.interleaved)
        k_pe = apply_rotary(k_pe, cos, sin, self.interleaved)
        exact = fb.mode is ForwardMode.EXTEND and self.tpla.pd_sep
        cached = self._latent_for_cache(c, exact)
        fb.kv_pool.write(self.layer_id, fb.out_cache_loc, cached, k_pe)
        if fb.kv_sink is not None:
            fb.kv_sink.on_layer(self.layer_id, cached, k_pe)
        if fb.capture is not None:
            fb.capture.observe(self.layer_id, self.kv_a_layernorm(c), self._absorb_full(q_nope))
        if exact:
            o = self._extend(q_nope, q_pe, self.kv_a_layernorm(c), k_pe, fb)
        else:
            o = self._decode(q_nope, q_pe, fb)
        return self.o_proj(o.reshape(n, -1))

    def _absorb_full(self, q_nope: torch.Tensor) -> torch.Tensor:
        """q̃ = W_UKᵀ q_nope over the whole latent [N, H, r] (calibration only: the rank holds all of W_UK)."""
        w = self.kv_b_proj.weight.view(self.num_local_heads, self.nope_dim + self.v_dim, self.kv_rank)
        return torch.bmm(q_nope.transpose(0, 1), w[:, : self.nope_dim]).transpose(0, 1)

    def _extend(
        self, q_nope: torch.Tensor, q_pe: torch.Tensor, c_hat: torch.Tensor, k_pe: torch.Tensor, fb: ForwardBatch
    ) -> torch.Tensor:
        """Exact MHA form over this rank's prefill heads: expand each KV token's full latent, causal attention.

        With a cached prefix the KV tokens are read from the pool, each distinct slot once and expanded
        once: requests that share a prefix (a system prompt, the samples of n > 1) share its pages.
        """
        e0, e1 = self.prefill_heads
        q = torch.cat([q_nope[:, e0:e1], q_pe[:, e0:e1]], dim=-1)
        assert fb.extend_kv is not None, "an EXTEND batch carries its KV layout"
        slots = fb.extend_kv.slots
        if slots is None:  # no prefix: the keys are the new tokens
            k, v = self._expand(c_hat, k_pe)
        else:
            ckv, kpe = fb.kv_pool.read(self.layer_id, slots)
            if self.layout.latent_groups > 1:  # a rank of g > 1 holds its slice: gather one rank per group
                per_rank = tp_all_gather(ckv, self.layout).view(ckv.shape[0], self.layout.tp_size, -1)
                ckv = per_rank[:, :: self.layout.ranks_per_group].reshape(ckv.shape[0], self.kv_rank)
            k, v = self._expand(ckv.to(c_hat.dtype), kpe.to(k_pe.dtype))
        o_heads = fb.attn_backend.extend(q, k, v, fb, self.scale)
        if e1 - e0 == self.num_local_heads:
            return o_heads
        o = o_heads.new_zeros(o_heads.shape[0], self.num_local_heads, self.v_dim)
        o[:, e0:e1] = o_heads  # the other heads are another group's share of o_proj's all-reduce
        return o

    def _expand(self, ckv: torch.Tensor, kpe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(k [T, h, d_nope + d_rope], v [T, h, d_v]) of T tokens' full latents, over this rank's prefill heads."""
        e0, e1 = self.prefill_heads
        kv_dim = self.nope_dim + self.v_dim
        w = self.kv_b_proj.weight.view(self.num_local_heads, kv_dim, self.kv_rank)[e0:e1]
        kv = torch.nn.functional.linear(ckv, w.reshape(-1, self.kv_rank)).view(-1, e1 - e0, kv_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        return torch.cat([k_nope, kpe[:, None].expand(-1, e1 - e0, -1)], dim=-1), v

    def _decode(self, q_nope: torch.Tensor, q_pe: torch.Tensor, fb: ForwardBatch) -> torch.Tensor:
        """Absorbed form over this rank's latent slice: q̃ = W_UKᵀ q_nope scores against ĉ; v = W_UV o."""
        if self.w_uk is None or self.w_uv is None:
            raise RuntimeError("decode needs W_UK/W_UV: call post_load_weights() after loading the weights")
        q_abs = torch.bmm(q_nope.transpose(0, 1), self.w_uk).transpose(0, 1)  # [N, H, r]
        o = fb.attn_backend.decode(q_abs, q_pe, self.layer_id, fb, self.scale, self.nope_scale)  # [N, H, r/g]
        return torch.bmm(o.transpose(0, 1), self.w_uv.transpose(1, 2)).transpose(0, 1)  # [N, H, d_v]
