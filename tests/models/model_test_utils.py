"""Tiny transformers DeepSeek models as the reference, and drivers that run ours through the paged cache."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM

from tpla_serve.cache.pool import LatentKVPool
from tpla_serve.forward_batch import BatchEntry, ForwardMode, build_forward_batch
from tpla_serve.layers.attention import create_attention_backend

# Max |ours - reference| over max |reference|, per logits tensor: fp32 everywhere, so only summation
# order separates the two implementations.
REL_TOL = 1e-4

VOCAB = 128
# Scales the query projections: unit-gain weights alone leave attention close to uniform.
QUERY_GAIN = 4.0

_BASE: dict[str, Any] = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 96,
    "moe_intermediate_size": 32,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "kv_lora_rank": 32,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8,
    "v_head_dim": 16,
    "n_routed_experts": 8,
    "num_experts_per_tok": 3,
    "max_position_embeddings": 1024,
}


def _yarn(mscale: float, mscale_all_dim: float) -> dict[str, Any]:
    return {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 256,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": mscale,
        "mscale_all_dim": mscale_all_dim,
    }


# name -> (architecture, config overrides). Together they cover: q_lora on/off; softmax+greedy,
# softmax+group_limited_greedy, sigmoid+noaux_tc with norm_topk_prob on/off; YaRN on (both with
# mscale == mscale_all_dim and with a cos/sin attention factor != 1) and off; V3 RoPE interleaved and
# not; first_k_dense_replace 0, 1, 2; rms_norm_eps != the latent norms' 1e-6.
HF_CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "v2-noqlora-greedy-yarn": (
        "v2",
        {
            "q_lora_rank": None,
            "topk_method": "greedy",
            "n_shared_experts": 2,
            "first_k_dense_replace": 1,
            "routed_scaling_factor": 1.5,
            "rms_norm_eps": 1e-5,
            "rope_parameters": _yarn(0.707, 0.707),
        },
    ),
    "v2-qlora-grouplimited-norope": (
        "v2",
        {
            "q_lora_rank": 24,
            "topk_method": "group_limited_greedy",
            "n_group": 4,
            "topk_group": 2,
            "n_shared_experts": 1,
            "first_k_dense_replace": 0,
            "routed_scaling_factor": 1.0,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        },
    ),
    "v3-qlora-noauxtc-norm-yarn-interleave": (
        "v3",
        {
            "q_lora_rank": 24,
            "n_group": 4,
            "topk_group": 2,
            "norm_topk_prob": True,
            "n_shared_experts": 1,
            "first_k_dense_replace": 1,
            "routed_scaling_factor": 2.5,
            "rope_interleave": True,
            "rope_parameters": _yarn(1.0, 0.5),
        },
    ),
    "v3-noqlora-nonorm-norope-halfsplit": (
        "v3",
        {
            "q_lora_rank": None,
            "n_group": 1,
            "topk_group": 1,
            "norm_topk_prob": False,
            "n_shared_experts": 2,
            "first_k_dense_replace": 2,
            "routed_scaling_factor": 2.0,
            "rope_interleave": False,
            "rope_parameters": {"rope_type": "default", "rope_theta": 50000.0},
        },
    ),
}


def build_hf_model(arch: str, overrides: dict[str, Any], seed: int = 0) -> torch.nn.Module:
    """A tiny transformers model with weights drawn so that attention is far from uniform and routing
    differs per token: matrices N(0, 1/fan_in) (unit-gain layers; queries QUERY_GAIN times that),
    embeddings N(0, 1), norm weights near 1, a visible noaux_tc correction bias."""
    kwargs = _BASE | overrides
    config_cls, model_cls = (
        (DeepseekV2Config, DeepseekV2ForCausalLM)
        if arch == "v2"
        else (DeepseekV3Config, DeepseekV3ForCausalLM)
    )
    config = config_cls(**kwargs, attn_implementation="eager")
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name:
                p.copy_(1.0 + 0.1 * noise)
            elif "embed_tokens" in name:
                p.copy_(noise)
            elif name.endswith(("q_proj.weight", "q_b_proj.weight")):
                p.copy_(QUERY_GAIN * noise / math.sqrt(p.shape[-1]))
            else:
                p.copy_(noise / math.sqrt(p.shape[-1]))
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(0.1 * torch.randn(buf.shape, generator=gen))
    return model


def save_hf_case(name: str, directory: Path, max_shard_size: str | None = None) -> torch.nn.Module:
    arch, overrides = HF_CASES[name]
    model = build_hf_model(arch, overrides)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    return model


@torch.no_grad()
def hf_logits(model: torch.nn.Module, tokens: list[int]) -> torch.Tensor:
    """Reference logits [T, vocab] of every position of one sequence."""
    return model(torch.tensor([tokens], device=model.device)).logits[0].float()


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def mean_rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().mean() / ref.abs().mean()).item()


def assert_bf16_no_worse_than_transformers(
    ours_bf16: torch.Tensor, hf_bf16: torch.Tensor, ref: torch.Tensor
) -> None:
    """bf16 has no exact reference; ours must stay as close to the fp32 logits as transformers' bf16 run does."""
    ours_err, hf_err = mean_rel_err(ours_bf16, ref), mean_rel_err(hf_bf16, ref)
    assert ours_err <= 1.25 * hf_err, f"bf16 mean relative error {ours_err:.3f} vs transformers' {hf_err:.3f}"
    top1 = ref.argmax(-1)
    ours_agree = (ours_bf16.argmax(-1) == top1).float().mean().item()
    hf_agree = (hf_bf16.argmax(-1) == top1).float().mean().item()
    assert ours_agree >= hf_agree - 0.05, (
        f"bf16 top-1 agreement {ours_agree:.3f} vs transformers' {hf_agree:.3f}"
    )


def assert_close_rel(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    err = rel_err(ours, ref)
    assert err <= REL_TOL, f"{what}: relative error {err:.2e} > {REL_TOL:.0e}"


@dataclass
class PagedRequest:
    """A sequence in the paged cache: its tokens, how many are cached, and its (scattered) pages."""

    tokens: list[int]
    pages: list[int]
    cached: int = 0


class PagedRunner:
    """Drives our model step by step through a LatentKVPool, handing out pages in shuffled order so that
    no request's pages are contiguous."""

    def __init__(self, model: torch.nn.Module, page_size: int, max_tokens: int, seed: int = 0) -> None:
        cfg = model.config
        self.model = model
        self.page_size = page_size
        self.device = model.lm_head.weight.device
        num_pages = max_tokens // page_size + 2
        self.pool = LatentKVPool(
            cfg.num_hidden_layers,
            num_pages,
            page_size,
            cfg.kv_lora_rank,
            cfg.qk_rope_head_dim,
            model.dtype,
            self.device,
        )
        self.backend = create_attention_backend("torch")
        self.free_pages = list(range(1, num_pages))
        random.Random(seed).shuffle(self.free_pages)

    def add(self, tokens: list[int]) -> PagedRequest:
        n = -(-len(tokens) // self.page_size)
        pages, self.free_pages = self.free_pages[:n], self.free_pages[n:]
        assert len(pages) == n, "test pool too small"
        return PagedRequest(tokens, pages)

    @torch.no_grad()
    def step(self, mode: ForwardMode, work: list[tuple[PagedRequest, int]]) -> list[torch.Tensor]:
        """Run the next `count` tokens of each request in one batch; logits [count, vocab] per request."""
        entries = [
            BatchEntry(r.tokens[r.cached : r.cached + count], r.cached, r.pages, logits_for_all=True)
            for r, count in work
        ]
        fb = build_forward_batch(mode, entries, self.pool, self.backend, self.device)
        self.backend.prepare(fb)
        logits = self.model(fb)
        for r, count in work:
            r.cached += count
        return list(logits.split([count for _, count in work]))


def prefill_then_decode(model: torch.nn.Module, tokens: list[int], prefill: int) -> torch.Tensor:
    """Logits of positions prefill-1.. of one sequence: one EXTEND of `prefill` tokens, then one DECODE
    step per remaining token."""
    runner = PagedRunner(model, page_size=16, max_tokens=len(tokens))
    request = runner.add(tokens)
    (logits,) = runner.step(ForwardMode.EXTEND, [(request, prefill)])
    steps = [runner.step(ForwardMode.DECODE, [(request, 1)])[0] for _ in range(len(tokens) - prefill)]
    return torch.cat([logits, *steps])
