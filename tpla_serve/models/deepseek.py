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

from tpla_serve.forward_batch import ForwardBatch
from tpla_serve.layers.activation import silu_and_mul
from tpla_serve.layers.linear import (
    MergedColumnParallelLinear,
    ParallelLMHead,
    RowParallelLinear,
    VocabParallelEmbedding,
    WeightSource,
    tp_all_reduce,
)
from tpla_serve.layers.moe import MoEExperts, MoEGate, grouped_gemm_capture_problem
from tpla_serve.layers.norm import RMSNorm
from tpla_serve.layers.rotary import RotaryEmbedding
from tpla_serve.models.config import ModelConfig
from tpla_serve.models.deepseek_mla import DeepseekAttention
from tpla_serve.models.weight_utils import CheckpointTensorError
from tpla_serve.tpla.calibration import Calibration
from tpla_serve.tpla.layout import ShardLayout
from tpla_serve.tpla.options import TPLAOptions
from tpla_serve.tpla.transforms import fold_norm_and_rotate

logger = logging.getLogger(__name__)

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
        x = x + self.attention(x, cos, sin, fb)
        return x + self.feed_forward(x)

    def attention(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, fb: ForwardBatch) -> torch.Tensor:
        """The attention sublayer's contribution to the residual stream x (writes this layer's KV)."""
        return self.self_attn(self.input_layernorm(x), cos, sin, fb)

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The MLP (or MoE) sublayer's contribution to the residual stream x."""
        return self.mlp(self.post_attention_layernorm(x))


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

    def embed(self, fb: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The residual stream's start (token embeddings) and the step's rotary cos/sin."""
        cos, sin = self.rotary_emb.cos_sin(fb.positions)
        return self.embed_tokens(fb.input_ids), cos, sin

    def forward(self, fb: ForwardBatch) -> torch.Tensor:
        x, cos, sin = self.embed(fb)
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

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.layers

    def embed(self, fb: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.model.embed(fb)

    def logits(self, x: torch.Tensor, fb: ForwardBatch) -> torch.Tensor:
        return self.compute_logits(self.model.norm(x[fb.logits_indices]))

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
