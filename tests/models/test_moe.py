"""MoE routing and expert dispatch against independent per-token references, including what transformers
does not model: V2's norm_topk_prob and moe_layer_freq."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F
from model_test_utils import QUERY_GAIN, PagedRunner, assert_close_rel, hf_logits
from transformers import DeepseekV2Config, DeepseekV2ForCausalLM
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2MLP

from tpla_serve.forward_batch import ForwardMode
from tpla_serve.layers.moe import MoEExperts, RoutingConfig, select_experts
from tpla_serve.models import load_model
from tpla_serve.tpla.layout import ShardLayout


def reference_route(logits: list[float], cfg: RoutingConfig, bias: list[float] | None) -> dict[int, float]:
    """One token's routing, written from DeepSeek's gate description with the serving engines' scaling:
    expert -> weight."""
    n = len(logits)
    if cfg.scoring_func == "softmax":
        m = max(logits)
        z = sum(math.exp(x - m) for x in logits)
        scores = [math.exp(x - m) / z for x in logits]
    else:
        scores = [1 / (1 + math.exp(-x)) for x in logits]
    choice = [s + (bias[e] if bias else 0.0) for e, s in enumerate(scores)]
    allowed = list(range(n))
    if cfg.topk_method != "greedy":
        size = n // cfg.n_group
        groups = [choice[g * size : (g + 1) * size] for g in range(cfg.n_group)]
        if cfg.topk_method == "group_limited_greedy":
            group_score = [max(g) for g in groups]
        else:
            group_score = [sum(sorted(g, reverse=True)[:2]) for g in groups]
        best = sorted(range(cfg.n_group), key=lambda g: -group_score[g])[: cfg.topk_group]
        allowed = [e for e in range(n) if e // size in best]
    chosen = sorted(allowed, key=lambda e: -choice[e])[: cfg.top_k]
    weights = {e: scores[e] for e in chosen}
    if cfg.norm_topk_prob:
        total = sum(weights.values())
        weights = {e: w / total for e, w in weights.items()}
    return {e: w * cfg.routed_scaling_factor for e, w in weights.items()}


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("method", ["greedy", "group_limited_greedy", "noaux_tc"])
@pytest.mark.parametrize("norm", [False, True])
def test_select_experts_matches_reference(scoring: str, method: str, norm: bool) -> None:
    cfg = RoutingConfig(
        num_experts=16,
        top_k=4,
        scoring_func=scoring,
        topk_method=method,
        n_group=4,
        topk_group=2,
        norm_topk_prob=norm,
        routed_scaling_factor=2.5,
    )
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(64, 16, generator=gen, dtype=torch.float64) * 2
    bias = torch.randn(16, generator=gen, dtype=torch.float64) * 0.3 if method == "noaux_tc" else None
    weights, ids = select_experts(logits, cfg, bias)
    for t in range(logits.shape[0]):
        ref = reference_route(logits[t].tolist(), cfg, None if bias is None else bias.tolist())
        ours = dict(zip(ids[t].tolist(), weights[t].tolist(), strict=True))
        assert ours.keys() == ref.keys(), f"token {t}"
        for e, w in ref.items():
            assert ours[e] == pytest.approx(w, rel=1e-5), f"token {t} expert {e}"


def test_correction_bias_steers_choice_but_not_weights() -> None:
    cfg = RoutingConfig(num_experts=4, top_k=1, scoring_func="sigmoid", topk_method="noaux_tc", n_group=1)
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    _, ids = select_experts(logits, cfg, torch.zeros(4))
    weights, biased_ids = select_experts(logits, cfg, torch.tensor([0.0, 0.0, 0.0, 5.0]))
    assert ids.item() == 0 and biased_ids.item() == 3
    assert weights.item() == pytest.approx(torch.sigmoid(torch.tensor(-1.0)).item())


@pytest.mark.parametrize(
    "tokens,num_experts,top_k,dtype",
    [(40, 6, 2, torch.float32), (1, 8, 2, torch.float32), (5, 8, 3, torch.float32), (4, 8, 2, torch.bfloat16)],
)
def test_expert_dispatch_matches_per_token_loop(tokens: int, num_experts: int, top_k: int, dtype: torch.dtype) -> None:
    """The grouped-GEMM dispatch against each token's experts run one by one in float64 (few tokens leave
    most experts without rows: empty groups)."""
    gen = torch.Generator().manual_seed(3 + tokens)
    experts = MoEExperts(
        num_experts=num_experts, hidden_size=16, intermediate_size=10, layout=ShardLayout(), dtype=dtype
    )
    assert experts.padded_inter == 16  # 10 units stored in 16 (zero padding)
    gates, ups, downs = (torch.randn(num_experts, *shape, generator=gen, dtype=torch.float64)
                         for shape in ((10, 16), (10, 16), (16, 10)))
    for e in range(num_experts):
        experts.load_expert(gates[e], e, "gate_proj")
        experts.load_expert(ups[e], e, "up_proj")
        experts.load_expert(downs[e], e, "down_proj")
    x = torch.randn(tokens, 16, generator=gen, dtype=torch.float64).to(dtype)
    ids = torch.stack([torch.randperm(num_experts, generator=gen)[:top_k] for _ in range(tokens)])
    weights = torch.rand(tokens, top_k, generator=gen, dtype=torch.float64)
    out = experts(x, weights.float(), ids)
    assert out.dtype == dtype and out.shape == x.shape
    xd = x.double()
    if dtype != torch.float32:  # the reference uses the weights as rounded to the model's dtype
        gates, ups, downs = (w.to(dtype).double() for w in (gates, ups, downs))
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    for t in range(tokens):
        ref = torch.zeros(16, dtype=torch.float64)
        for k in range(top_k):
            e = ids[t, k].item()
            ref += weights[t, k] * (downs[e] @ (F.silu(gates[e] @ xd[t]) * (ups[e] @ xd[t])))
        torch.testing.assert_close(out[t].double(), ref, rtol=tol, atol=tol * ref.abs().max().item())


def test_routing_config_rejects_impossible_groups() -> None:
    with pytest.raises(ValueError, match="n_group"):
        RoutingConfig(num_experts=10, top_k=2, topk_method="noaux_tc", n_group=4)
    with pytest.raises(ValueError, match="cannot supply"):
        RoutingConfig(num_experts=8, top_k=6, topk_method="group_limited_greedy", n_group=4, topk_group=2)
    with pytest.raises(ValueError, match="top-2"):
        RoutingConfig(num_experts=8, top_k=2, topk_method="noaux_tc", n_group=8, topk_group=4)


def test_moe_layer_freq_against_a_hybrid_transformers_model(tmp_path) -> None:
    """transformers ignores moe_layer_freq; the reference here is its V2 model with the MLP of every layer
    that moe_layer_freq = 2 makes dense swapped for transformers' own dense DeepseekV2MLP."""
    config = DeepseekV2Config(
        vocab_size=96,
        hidden_size=48,
        intermediate_size=80,
        moe_intermediate_size=24,
        num_hidden_layers=5,
        num_attention_heads=4,
        num_key_value_heads=4,
        kv_lora_rank=24,
        q_lora_rank=None,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=12,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_shared_experts=1,
        first_k_dense_replace=1,
        moe_layer_freq=2,
        routed_scaling_factor=1.0,
        max_position_embeddings=512,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    hf = DeepseekV2ForCausalLM(config).eval()
    for odd in (1, 3):  # layer 0 is dense by first_k_dense_replace, odd layers by moe_layer_freq
        hf.model.layers[odd].mlp = DeepseekV2MLP(config)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            gain = QUERY_GAIN if name.endswith("q_proj.weight") else 1.0
            p.copy_(
                1 + 0.1 * noise
                if "norm" in name
                else noise
                if "embed" in name
                else gain * noise / p.shape[-1] ** 0.5
            )
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path, dtype=torch.float32, show_progress=False)
    assert [type(layer.mlp).__name__ for layer in ours.model.layers] == [
        "DeepseekMLP",
        "DeepseekMLP",
        "DeepseekMoE",
        "DeepseekMLP",
        "DeepseekMoE",
    ]
    tokens = [random.Random(0).randrange(96) for _ in range(120)]
    runner = PagedRunner(ours, page_size=8, max_tokens=128)
    request = runner.add(tokens)
    (prefill,) = runner.step(ForwardMode.EXTEND, [(request, 100)])
    decode = torch.cat([runner.step(ForwardMode.DECODE, [(request, 1)])[0] for _ in range(20)])
    assert_close_rel(torch.cat([prefill, decode]), hf_logits(hf, tokens), "moe_layer_freq = 2")
