"""Mixture-of-experts routing and a straightforward expert dispatch.

Routing follows DeepSeek's gates as the serving engines (SGLang, vLLM) run them: scores are softmax or
sigmoid of fp32 router logits; experts are picked greedily, within the best groups by their top score
(`group_limited_greedy`, DeepSeek-V2) or within the best groups by the sum of their two top
bias-corrected scores (`noaux_tc`, DeepSeek-V3). The correction bias only steers the choice; weights
come from the raw scores, renormalized when norm_topk_prob is set, then multiplied by
routed_scaling_factor (always, also when renormalized).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tpla_serve.layers.activation import silu_and_mul
from tpla_serve.layers.linear import WeightSource, load_full, load_slice
from tpla_serve.tpla.layout import ShardLayout

SCORING_FUNCS = ("softmax", "sigmoid")
GROUPED_GEMM_ALIGN = 8  # elements: 16-byte row strides for 16-bit weights
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")


@dataclass(frozen=True)
class RoutingConfig:
    num_experts: int
    top_k: int
    scoring_func: str = "softmax"
    topk_method: str = "greedy"
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0

    def __post_init__(self) -> None:
        if self.scoring_func not in SCORING_FUNCS:
            raise ValueError(f"scoring_func {self.scoring_func!r} is not one of {', '.join(SCORING_FUNCS)}")
        if self.topk_method not in TOPK_METHODS:
            raise ValueError(f"topk_method {self.topk_method!r} is not one of {', '.join(TOPK_METHODS)}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"num_experts_per_tok ({self.top_k}) must be in [1, n_routed_experts]")
        if self.topk_method != "greedy":
            if self.n_group < 1 or self.num_experts % self.n_group:
                raise ValueError(
                    f"n_group ({self.n_group}) must divide n_routed_experts ({self.num_experts})"
                )
            if not 1 <= self.topk_group <= self.n_group:
                raise ValueError(f"topk_group ({self.topk_group}) must be in [1, n_group={self.n_group}]")
            if self.topk_group * self.experts_per_group < self.top_k:
                raise ValueError(
                    f"topk_group ({self.topk_group}) groups of {self.experts_per_group} experts cannot "
                    f"supply num_experts_per_tok ({self.top_k}) experts"
                )
            if self.topk_method == "noaux_tc" and self.experts_per_group < 2:
                raise ValueError(
                    "noaux_tc ranks groups by their top-2 experts: it needs >= 2 experts per group"
                )

    @property
    def experts_per_group(self) -> int:
        return self.num_experts // self.n_group


def select_experts(
    router_logits: torch.Tensor, cfg: RoutingConfig, correction_bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k experts per token: (weights [N, k] fp32, ids [N, k] int64) from router logits [N, E]."""
    logits = router_logits.float()
    scores = logits.softmax(dim=-1) if cfg.scoring_func == "softmax" else logits.sigmoid()
    choice = scores if correction_bias is None else scores + correction_bias.float()
    if cfg.topk_method != "greedy":
        grouped = choice.view(-1, cfg.n_group, cfg.experts_per_group)
        if cfg.topk_method == "group_limited_greedy":
            group_scores = grouped.amax(dim=-1)
        else:
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
        top_groups = group_scores.topk(cfg.topk_group, dim=-1, sorted=False).indices
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, top_groups, True)
        expert_mask = group_mask[:, :, None].expand_as(grouped).reshape_as(choice)
        choice = choice.masked_fill(~expert_mask, float("-inf"))
    ids = choice.topk(cfg.top_k, dim=-1, sorted=False).indices
    weights = scores.gather(1, ids)
    if cfg.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * cfg.routed_scaling_factor, ids


def grouped_gemm_capture_problem(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why a CUDA graph cannot hold the experts' grouped GEMM on `device` in `dtype`, or None. torch's CUDA
    kernel for it (bfloat16, compute capability 9.x and 10.x) reads the group offsets on the device; in other
    cases torch falls back to a loop that copies them to the host."""
    if device.type != "cuda":
        return None
    if dtype != torch.bfloat16:
        return f"MoE layers in {dtype} run torch's host-synchronizing grouped-GEMM fallback (bfloat16 is captured)"
    major, minor = torch.cuda.get_device_capability(device)
    if major not in (9, 10):
        return f"torch's grouped GEMM for MoE layers has no CUDA kernel for compute capability {major}.{minor}"
    return None


class MoEGate(nn.Module):
    """The router: fp32 logits W_g·h (weights kept in fp32, as trained), plus noaux_tc's correction bias."""

    def __init__(self, hidden_size: int, cfg: RoutingConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(
            torch.empty(cfg.num_experts, hidden_size, dtype=torch.float32), requires_grad=False
        )
        self.weight.weight_loader = load_full  # type: ignore[attr-defined]
        self.e_score_correction_bias: nn.Parameter | None = None
        if cfg.topk_method == "noaux_tc":
            self.e_score_correction_bias = nn.Parameter(
                torch.empty(cfg.num_experts, dtype=torch.float32), requires_grad=False
            )
            self.e_score_correction_bias.weight_loader = load_full  # type: ignore[attr-defined]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights [N, k] fp32, expert ids [N, k]) for hidden states x [N, H]."""
        logits = F.linear(x.float(), self.weight)
        return select_experts(logits, self.cfg, self.e_score_correction_bias)


class MoEExperts(nn.Module):
    """E SwiGLU experts stacked: w13 [E, 2·P, H] (gate rows, then up rows) and w2 [E, H, P].

    Under TP each rank keeps a slice of every expert's intermediate dimension (I_local wide); forward then
    returns a partial sum that the caller all-reduces (together with the shared experts' partial sum). The
    slice is stored zero-padded to P, a multiple of 8, because the grouped GEMM needs 16-byte row strides;
    padded units compute silu(0)·0 = 0. Real DeepSeek widths need no padding.
    """

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        layout: ShardLayout,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.inter_start, inter_end = layout.shard_range(intermediate_size)
        if hidden_size % GROUPED_GEMM_ALIGN:
            raise ValueError(f"hidden_size ({hidden_size}) must be a multiple of {GROUPED_GEMM_ALIGN} for MoE layers")
        self.local_inter = inter_end - self.inter_start
        self.padded_inter = -(-self.local_inter // GROUPED_GEMM_ALIGN) * GROUPED_GEMM_ALIGN
        self.w13 = nn.Parameter(
            torch.zeros(num_experts, 2 * self.padded_inter, hidden_size, dtype=dtype), requires_grad=False
        )
        self.w2 = nn.Parameter(
            torch.zeros(num_experts, hidden_size, self.padded_inter, dtype=dtype), requires_grad=False
        )

    def load_expert(self, src: WeightSource, expert: int, proj: str) -> None:
        """One expert's `gate_proj` / `up_proj` [I, H] or `down_proj` [H, I] (DeepSeek checkpoint layout)."""
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"expert {expert} is outside [0, {self.num_experts})")
        h, i, local, padded = self.hidden_size, self.intermediate_size, self.local_inter, self.padded_inter
        if proj == "down_proj":
            load_slice(self.w2[expert].narrow(1, 0, local), src, (h, i), 1, self.inter_start)
        elif proj in ("gate_proj", "up_proj"):
            dst = self.w13[expert].narrow(0, 0 if proj == "gate_proj" else padded, local)
            load_slice(dst, src, (i, h), 0, self.inter_start)
        else:
            raise ValueError(f"unknown expert projection {proj!r}")

    def load_fused(self, src: WeightSource, name: str) -> None:
        """All experts at once: `gate_up_proj` [E, 2I, H] or `down_proj` [E, H, I] (transformers 5)."""
        e, h, i, local, padded = (
            self.num_experts, self.hidden_size, self.intermediate_size, self.local_inter, self.padded_inter
        )
        if name == "down_proj":
            load_slice(self.w2.narrow(2, 0, local), src, (e, h, i), 2, self.inter_start)
        elif name == "gate_up_proj":
            load_slice(self.w13.narrow(1, 0, local), src, (e, 2 * i, h), 1, self.inter_start)
            load_slice(self.w13.narrow(1, padded, local), src, (e, 2 * i, h), 1, i + self.inter_start)
        else:
            raise ValueError(f"unknown fused expert tensor {name!r}")

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """Σ_k w_k · expert_{id_k}(x) per token. The N·k token-expert pairs are sorted by expert and each
        projection runs as one grouped GEMM over the experts' contiguous row ranges: shapes are static and
        the row ranges stay on the device, so a CUDA graph can hold the whole layer at any batch size."""
        n, top_k = topk_ids.shape
        flat_ids = topk_ids.flatten()
        order = flat_ids.argsort(stable=True)
        counts = torch.zeros(self.num_experts, dtype=torch.int32, device=x.device)
        counts.scatter_add_(0, flat_ids, torch.ones_like(flat_ids, dtype=torch.int32))
        ends = counts.cumsum(0, dtype=torch.int32)
        rows = x[order // top_k]
        h = silu_and_mul(torch._grouped_mm(rows, self.w13.transpose(1, 2), offs=ends))
        h = torch._grouped_mm(h, self.w2.transpose(1, 2), offs=ends)
        acc_dtype = torch.promote_types(x.dtype, torch.float32)
        weighted = torch.empty(n * top_k, self.hidden_size, dtype=acc_dtype, device=x.device)
        weighted[order] = h.to(acc_dtype) * topk_weights.flatten()[order, None]
        return weighted.view(n, top_k, -1).sum(dim=1).to(x.dtype)
