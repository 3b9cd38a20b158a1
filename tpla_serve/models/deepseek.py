"""DeepSeek-V2/V3 (and Kimi-K2) causal LM: multi-head latent attention over the paged latent cache, MoE MLP.

One implementation serves both HF architectures; their differences (RoPE layout, routing defaults) are
config values. Every layer writes its new tokens' (ĉ, k_pe) into the pool first; prefill (EXTEND) then
runs exact attention in MHA form over keys/values expanded from the cached latent, and decode runs the
absorbed form directly on the latent (DESIGN §2).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

import torch
from torch import nn

from tpla_serve.forward_batch import ForwardBatch, ForwardMode
from tpla_serve.layers.activation import silu_and_mul
from tpla_serve.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    ParallelLMHead,
    ReplicatedLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    WeightSource,
    tp_all_gather,
    tp_all_reduce,
)
from tpla_serve.layers.moe import MoEExperts, MoEGate, grouped_gemm_capture_problem
from tpla_serve.layers.norm import RMSNorm
from tpla_serve.layers.rotary import RotaryEmbedding, apply_rotary
from tpla_serve.models.config import ModelConfig
from tpla_serve.models.weight_utils import CheckpointTensorError
from tpla_serve.tpla.calibration import Calibration
from tpla_serve.tpla.layout import ShardLayout
from tpla_serve.tpla.options import TPLAOptions
from tpla_serve.tpla.transforms import fold_norm_and_rotate

logger = logging.getLogger(__name__)

# DeepSeek's reference code builds the q/kv latent norms with the class default eps, not rms_norm_eps.
LATENT_NORM_EPS = 1e-6

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_FUSED_EXPERTS = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
_PACKED = re.compile(r"^(.*\.mlp(?:\.shared_experts)?)\.(gate_proj|up_proj)\.weight$")
_PACKED_SHARD = {"gate_proj": 0, "up_proj": 1}


class DeepseekMLP(nn.Module):
    """SwiGLU MLP: the dense layers and the shared experts."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        layout: ShardLayout,
        dtype: torch.dtype,
        reduce_results: bool = True,
    ) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            hidden_size, [intermediate_size, intermediate_size], layout, dtype=dtype
        )
        self.down_proj = RowParallelLinear(
            intermediate_size, hidden_size, layout, dtype=dtype, reduce_results=reduce_results
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class DeepseekMoE(nn.Module):
    """Routed experts plus always-on shared experts; one all-reduce for both partial sums under TP."""

    def __init__(self, config: ModelConfig, layout: ShardLayout, dtype: torch.dtype) -> None:
        super().__init__()
        self.layout = layout
        routing = config.routing
        self.gate = MoEGate(config.hidden_size, routing)
        self.experts = MoEExperts(
            routing.num_experts, config.hidden_size, config.moe_intermediate_size, layout, dtype=dtype
        )
        self.shared_experts: DeepseekMLP | None = None
        if config.n_shared_experts > 0:
            self.shared_experts = DeepseekMLP(
                config.hidden_size,
                config.moe_intermediate_size * config.n_shared_experts,
                layout,
                dtype,
                reduce_results=False,
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        topk_weights, topk_ids = self.gate(x)
        out = self.experts(x, topk_weights, topk_ids)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return tp_all_reduce(out, self.layout)


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

    def _full_latent(self, c_hat: torch.Tensor, k_pe: torch.Tensor, fb: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(ĉ, k_pe) of every KV token of the batch, prefix then new per request, over the whole latent.

        Without a cached prefix these are just the new tokens'. With one, a rank of g > 1 holds only its
        slice of the prefix, so the slices are gathered from one rank of each group.
        """
        if all(q == s for q, s in zip(fb.q_lens, fb.seq_lens)):
            return c_hat, k_pe
        ckv, kpe = fb.kv_pool.read(self.layer_id, fb.kv_indices)
        if self.layout.latent_groups > 1:
            per_rank = tp_all_gather(ckv, self.layout).view(ckv.shape[0], self.layout.tp_size, -1)
            ckv = per_rank[:, :: self.layout.ranks_per_group].reshape(ckv.shape[0], self.kv_rank)
        return ckv.to(c_hat.dtype), kpe.to(k_pe.dtype)

    def _extend(
        self, q_nope: torch.Tensor, q_pe: torch.Tensor, c_hat: torch.Tensor, k_pe: torch.Tensor, fb: ForwardBatch
    ) -> torch.Tensor:
        """Exact MHA form over this rank's prefill heads: expand each KV token's full latent, causal attention."""
        e0, e1 = self.prefill_heads
        ckv, kpe = self._full_latent(c_hat, k_pe, fb)
        kv_dim = self.nope_dim + self.v_dim
        w = self.kv_b_proj.weight.view(self.num_local_heads, kv_dim, self.kv_rank)[e0:e1]
        kv = torch.nn.functional.linear(ckv, w.reshape(-1, self.kv_rank)).view(-1, e1 - e0, kv_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        q = torch.cat([q_nope[:, e0:e1], q_pe[:, e0:e1]], dim=-1)
        k = torch.cat([k_nope, kpe[:, None].expand(-1, e1 - e0, -1)], dim=-1)
        o_heads = fb.attn_backend.extend(q, k, v, fb, self.scale)
        if e1 - e0 == self.num_local_heads:
            return o_heads
        o = o_heads.new_zeros(o_heads.shape[0], self.num_local_heads, self.v_dim)
        o[:, e0:e1] = o_heads  # the other heads are another group's share of o_proj's all-reduce
        return o

    def _decode(self, q_nope: torch.Tensor, q_pe: torch.Tensor, fb: ForwardBatch) -> torch.Tensor:
        """Absorbed form over this rank's latent slice: q̃ = W_UKᵀ q_nope scores against ĉ; v = W_UV o."""
        if self.w_uk is None or self.w_uv is None:
            raise RuntimeError("decode needs W_UK/W_UV: call post_load_weights() after loading the weights")
        q_abs = torch.bmm(q_nope.transpose(0, 1), self.w_uk).transpose(0, 1)  # [N, H, r]
        o = fb.attn_backend.decode(q_abs, q_pe, self.layer_id, fb, self.scale, self.nope_scale)  # [N, H, r/g]
        return torch.bmm(o.transpose(0, 1), self.w_uv.transpose(1, 2)).transpose(0, 1)  # [N, H, d_v]


class DeepseekDecoderLayer(nn.Module):
    def __init__(
        self, config: ModelConfig, layer_id: int, layout: ShardLayout, dtype: torch.dtype, tpla: TPLAOptions
    ) -> None:
        super().__init__()
        self.self_attn = DeepseekAttention(config, layer_id, layout, dtype, tpla)
        self.mlp: DeepseekMoE | DeepseekMLP
        if config.is_moe_layer(layer_id):
            self.mlp = DeepseekMoE(config, layout, dtype)
        else:
            self.mlp = DeepseekMLP(config.hidden_size, config.intermediate_size, layout, dtype)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, fb: ForwardBatch
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, fb)
        return x + self.mlp(self.post_attention_layernorm(x))


class DeepseekModel(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        layout: ShardLayout,
        dtype: torch.dtype,
        device: torch.device | str,
        tpla: TPLAOptions,
    ) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, layout, dtype=dtype)
        self.rotary_emb = RotaryEmbedding(
            config.qk_rope_head_dim, config.rope, config.rope_interleave, device=device
        )
        self.layers = nn.ModuleList(
            DeepseekDecoderLayer(config, i, layout, dtype, tpla) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)

    def forward(self, fb: ForwardBatch) -> torch.Tensor:
        x = self.embed_tokens(fb.input_ids)
        cos, sin = self.rotary_emb.cos_sin(fb.positions)
        for layer in self.layers:
            x = layer(x, cos, sin, fb)
        return self.norm(x)


class DeepseekForCausalLM(nn.Module):
    """The HF architectures DeepseekV2ForCausalLM and DeepseekV3ForCausalLM.

    Parameters are named as in the checkpoints, except that gate/up projections are fused
    (`gate_up_proj`) and routed experts are stacked (`experts.w13`, `experts.w2`).
    The caller runs fb.attn_backend.prepare(fb) once per step before forward().
    """

    def __init__(
        self,
        config: ModelConfig,
        layout: ShardLayout = ShardLayout(),
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
        tpla: TPLAOptions = TPLAOptions(),
    ) -> None:
        super().__init__()
        if config.mlp_bias:
            raise ValueError(f"{config.source}: mlp_bias = true is not supported by DeepSeek models")
        self.config = config
        self.layout = layout
        self.dtype = dtype
        with torch.device(device):
            self.model = DeepseekModel(config, layout, dtype, device, tpla)
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, layout, dtype=dtype)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def cuda_graph_problem(self) -> str | None:
        """Why this model's decode step cannot be captured in a CUDA graph, or None."""
        if not any(isinstance(layer.mlp, DeepseekMoE) for layer in self.model.layers):
            return None
        return grouped_gemm_capture_problem(self.lm_head.weight.device, self.dtype)

    def forward(self, fb: ForwardBatch) -> torch.Tensor:
        """fp32 logits [len(fb.logits_indices), vocab]."""
        return self.compute_logits(self.model(fb)[fb.logits_indices])

    def forward_with_hidden(self, fb: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits as forward() gives them, final-norm hidden states [N, hidden] of all N new tokens)."""
        hidden = self.model(fb)
        return self.compute_logits(hidden[fb.logits_indices]), hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def fingerprint_probe(self) -> torch.Tensor:
        """A weight every rank holds whole (kv_a_proj is replicated), to fingerprint the checkpoint."""
        return self.model.layers[0].self_attn.kv_a_proj_with_mqa.weight

    @torch.no_grad()
    def transform_latent(
        self, rotations: list[torch.Tensor | None], fold_norm: bool, calibration: Calibration | None
    ) -> None:
        """Fold γ and the orthogonal latent transform into the weights, set each layer's logit scale μ."""
        for i, layer in enumerate(self.model.layers):
            attn = layer.self_attn
            if fold_norm:
                fold_norm_and_rotate(
                    attn.kv_a_proj_with_mqa.weight,
                    attn.kv_a_proj_with_mqa.bias,
                    attn.kv_a_layernorm.weight,
                    attn.kv_b_proj.weight,
                    rotations[i],
                )
            if calibration is not None:
                attn.nope_scale = float(calibration.mu[i, self.layout.group])

    def post_load_weights(self) -> None:
        """Derive the absorbed-decode weights from the loaded ones; rerun after changing kv_b_proj."""
        for layer in self.model.layers:
            layer.self_attn.post_load_weights()

    # --- weights ---------------------------------------------------------------------------------

    def checkpoint_tensor_names(self) -> list[str]:
        """Every tensor a complete checkpoint provides for this model, in the per-expert layout."""
        names: list[str] = []
        for pname, _ in self.named_parameters():
            if pname.endswith(".gate_up_proj.weight"):
                base = pname.removesuffix(".gate_up_proj.weight")
                names += [f"{base}.gate_proj.weight", f"{base}.up_proj.weight"]
            elif pname.endswith(".experts.w13"):
                base = pname.removesuffix(".w13")
                for e in range(self._num_experts):
                    names += [f"{base}.{e}.gate_proj.weight", f"{base}.{e}.up_proj.weight"]
            elif pname.endswith(".experts.w2"):
                base = pname.removesuffix(".w2")
                names += [f"{base}.{e}.down_proj.weight" for e in range(self._num_experts)]
            else:
                names.append(pname)
        return names

    @property
    def _num_experts(self) -> int:
        return self.config.n_routed_experts or 0

    def load_weights(self, weights: Iterable[tuple[str, WeightSource]]) -> set[str]:
        """Copy checkpoint tensors in; returns the checkpoint names now covered (see checkpoint_tensor_names).

        Layers past num_hidden_layers (DeepSeek-V3's multi-token-prediction layer) are skipped.
        Raises CheckpointTensorError for a tensor the model has no place for or whose shape is wrong.
        """
        params = dict(self.named_parameters())
        covered: set[str] = set()
        skipped_layers: set[int] = set()
        for name, src in weights:
            layer = _LAYER.match(name)
            if layer is not None and int(layer.group(1)) >= self.config.num_hidden_layers:
                skipped_layers.add(int(layer.group(1)))
                continue
            if name.endswith(".rotary_emb.inv_freq") or (
                name == "lm_head.weight" and self.config.tie_word_embeddings
            ):
                continue
            try:
                covered |= self._load_tensor(name, src, params)
            except ValueError as e:
                if isinstance(e, CheckpointTensorError):
                    raise
                raise CheckpointTensorError(name, str(e)) from e
        if skipped_layers:
            logger.info(
                "skipped checkpoint layers %s: the model has num_hidden_layers = %d",
                sorted(skipped_layers),
                self.config.num_hidden_layers,
            )
        return covered

    def _load_tensor(self, name: str, src: WeightSource, params: dict[str, nn.Parameter]) -> set[str]:
        if m := _EXPERT.match(name):
            self._experts(int(m.group(1))).load_expert(src, int(m.group(2)), m.group(3))
            return {name}
        if m := _FUSED_EXPERTS.match(name):
            experts = self._experts(int(m.group(1)))
            experts.load_fused(src, m.group(2))
            base = name.rsplit(".", 1)[0]
            projs = ("gate_proj", "up_proj") if m.group(2) == "gate_up_proj" else ("down_proj",)
            return {f"{base}.{e}.{p}.weight" for e in range(experts.num_experts) for p in projs}
        if m := _PACKED.match(name):
            param = params.get(f"{m.group(1)}.gate_up_proj.weight")
            if param is None:
                raise CheckpointTensorError(name, "the model has no such parameter")
            param.weight_loader(param, src, _PACKED_SHARD[m.group(2)])  # type: ignore[attr-defined]
            return {name}
        param = params.get(name)
        if param is None or ".mlp.experts." in name:
            raise CheckpointTensorError(name, "the model has no such parameter")
        param.weight_loader(param, src)  # type: ignore[attr-defined]
        return {name}

    def _experts(self, layer: int) -> MoEExperts:
        mlp = self.model.layers[layer].mlp
        if not isinstance(mlp, DeepseekMoE):
            raise ValueError(f"layer {layer} is a dense layer in this config: it has no routed experts")
        return mlp.experts
