"""TPLA on T gloo ranks against single-process MLA and against a dense TPLA written here from DESIGN §3.

The reference below reuses transformers' DeepSeek-V3 modules for everything but attention (embeddings,
projections, norms, RoPE, MoE) and writes the attention math itself: exact MLA for prompt positions
(pd-sep), and for decode positions each latent group's own softmax over its slice of the cache, scaled
by μ, with the groups' value outputs summed before o_proj.
"""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
    apply_rotary_pos_emb,
    apply_rotary_pos_emb_interleave,
)

from tpla_serve.config import EngineConfig
from tpla_serve.entrypoints.rank import RankParts, launch_rank0
from tpla_serve.tools.teacher_forcing import teacher_forced_logits
from tpla_serve.tpla.calibration import Calibration

PROMPT_LEN, CONT_LEN = 40, 12
TOL = 1e-4  # relative to the largest reference logit, fp32


def make_rank(model_dir, **kw) -> RankParts:
    return launch_rank0(EngineConfig(model_path=str(model_dir), dtype="float32", device="cpu", page_size=4,
                                     max_total_tokens=256, **kw))


def close(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def tokens(tiny_v3_dir) -> tuple[list[int], list[int]]:
    rng = random.Random(7)
    ids = [rng.randrange(2, 300) for _ in range(PROMPT_LEN + CONT_LEN)]
    return ids[:PROMPT_LEN], ids[PROMPT_LEN:]


@pytest.fixture(scope="module")
def mla_logits(tiny_v3_dir, tokens) -> torch.Tensor:
    runner = make_rank(tiny_v3_dir).runner
    return teacher_forced_logits(runner, *tokens)


@torch.no_grad()
def dense_tpla_logits(hf, ids: list[int], prompt_len: int, groups: int, norm: str, mu: torch.Tensor) -> torch.Tensor:
    """Logits at positions prompt_len-1 .. len(ids)-1: exact MLA for prompt queries, TPLA for the rest."""
    cfg = hf.config
    n, r, nope = len(ids), cfg.kv_lora_rank, cfg.qk_nope_head_dim
    width = r // groups
    pos = torch.arange(n)
    causal = pos[None, :] <= pos[:, None]  # [query, key]
    h = hf.model.embed_tokens(torch.tensor([ids]))
    cos, sin = hf.model.rotary_emb(h, pos[None])
    rope = apply_rotary_pos_emb_interleave if cfg.rope_interleave else apply_rotary_pos_emb
    for li, layer in enumerate(hf.model.layers):
        attn = layer.self_attn
        a = layer.input_layernorm(h)
        q = attn.q_b_proj(attn.q_a_layernorm(attn.q_a_proj(a))).view(1, n, -1, attn.qk_head_dim).transpose(1, 2)
        q_nope, q_pe = q.split([nope, cfg.qk_rope_head_dim], dim=-1)  # [1, H, n, *]
        c, k_pe = attn.kv_a_proj_with_mqa(a).split([r, cfg.qk_rope_head_dim], dim=-1)
        q_pe, k_pe = rope(q_pe, k_pe.view(1, 1, n, -1), cos, sin)
        q_nope, q_pe, k_pe = q_nope[0], q_pe[0], k_pe[0, 0]  # [H, n, *], [n, d_r]
        gamma, eps = attn.kv_a_layernorm.weight, attn.kv_a_layernorm.variance_epsilon
        c_exact = attn.kv_a_layernorm(c)[0]  # [n, r]
        w = attn.kv_b_proj.weight.view(cfg.num_attention_heads, nope + cfg.v_head_dim, r)
        w_uk, w_uv = w[:, :nope], w[:, nope:]
        rope_scores = torch.einsum("hqd,td->hqt", q_pe, k_pe)

        # Prompt queries: exact MLA in MHA form.
        k_nope = torch.einsum("hdr,tr->htd", w_uk, c_exact)
        v = torch.einsum("hdr,tr->htd", w_uv, c_exact)
        s = (torch.einsum("hqd,htd->hqt", q_nope, k_nope) + rope_scores) * attn.scaling
        exact_out = torch.softmax(s.masked_fill(~causal, float("-inf")), -1) @ v  # [H, n, d_v]

        # Decode queries: group i attends over its slice with its own softmax; outputs summed.
        tpla_out = torch.zeros_like(exact_out)
        for i in range(groups):
            sl = slice(i * width, (i + 1) * width)
            cache = c_exact[:, sl].clone()
            if norm == "local":  # decode tokens' cache entries were normalized over the slice alone
                part = c[0, prompt_len:, sl]
                cache[prompt_len:] = part * torch.rsqrt(part.pow(2).mean(-1, keepdim=True) + eps) * gamma[sl]
            q_abs = torch.einsum("hqd,hdr->hqr", q_nope, w_uk[:, :, sl])
            s = (mu[li, i] * torch.einsum("hqr,tr->hqt", q_abs, cache) + rope_scores) * attn.scaling
            p = torch.softmax(s.masked_fill(~causal, float("-inf")), -1)
            tpla_out += torch.einsum("hqt,tr,hdr->hqd", p, cache, w_uv[:, :, sl])
        out = torch.where((pos < prompt_len)[None, :, None], exact_out, tpla_out)
        h = h + attn.o_proj(out.transpose(0, 1).reshape(1, n, -1))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    logits = hf.lm_head(hf.model.norm(h))[0].float()
    return logits[prompt_len - 1 :]


@pytest.mark.parametrize("tp_size", [2, 4])
def test_mla_tp_reproduces_single_process(tiny_v3_dir, tokens, mla_logits, tp_size):
    rank = make_rank(tiny_v3_dir, tp_size=tp_size)
    runner = rank.runner
    try:
        got = teacher_forced_logits(runner, *tokens)
        assert runner.kv_pool.ckv[0].shape[-1] == runner.model_config.kv_lora_rank
    finally:
        rank.close()
    assert close(got, mla_logits) < TOL


@pytest.mark.parametrize("transform", ["hadamard", "pca"])
def test_transforms_leave_mla_unchanged(tiny_v3_dir, tokens, mla_logits, tmp_path, transform):
    """With g = 1, folding γ and rotating the latent by any orthogonal U is exact."""
    calib = None
    if transform == "pca":
        probe = make_rank(tiny_v3_dir).runner
        r, layers = probe.model_config.kv_lora_rank, probe.model_config.num_hidden_layers
        q, _ = torch.linalg.qr(torch.randn(layers, r, r, generator=torch.Generator().manual_seed(0)))
        calib = tmp_path / "calib.safetensors"
        Calibration(probe.model.fingerprint, 1, "pca", torch.ones(layers, 1), tuple(q)).save(calib)
    rank = make_rank(tiny_v3_dir, tpla_transform=transform, tpla_calibration=str(calib) if calib else None)
    runner = rank.runner
    assert close(teacher_forced_logits(runner, *tokens), mla_logits) < TOL


@pytest.fixture(scope="module")
def hf_model(tiny_v3_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_v3_dir, attn_implementation="eager", dtype=torch.float32).eval()


@pytest.mark.parametrize(
    "tp_size, norm, calibrated",
    [(2, "exact", False), (2, "local", False), (2, "exact", True), (2, "local", True), (4, "exact", True)],
)
def test_tpla_decode_equals_dense_formula(tiny_v3_dir, tokens, hf_model, tmp_path, tp_size, norm, calibrated):
    groups = 2
    layers = hf_model.config.num_hidden_layers
    mu = torch.ones(layers, groups)
    kw: dict = {}
    if calibrated:
        mu = torch.tensor([[1.3, 0.7], [0.9, 1.6], [1.1, 0.5]])[:layers]
        fingerprint = make_rank(tiny_v3_dir).runner.model.fingerprint
        path = tmp_path / "mu.safetensors"
        Calibration(fingerprint, groups, "none", mu).save(path)
        kw["tpla_calibration"] = str(path)
    rank = make_rank(tiny_v3_dir, tp_size=tp_size, tpla_groups=groups, tpla_norm=norm, **kw)
    runner = rank.runner
    try:
        cfg = runner.model_config
        # The memory really shrinks: this rank caches r/g latent dims plus the full k_pe.
        assert runner.kv_pool.ckv[0].shape[-1] == cfg.kv_lora_rank // groups
        assert runner.kv_pool.kpe[0].shape[-1] == cfg.qk_rope_head_dim
        assert runner.kv_bytes_per_token == cfg.num_hidden_layers * (cfg.kv_lora_rank // groups + cfg.qk_rope_head_dim) * 4
        got = teacher_forced_logits(runner, *tokens)
    finally:
        rank.close()
    prompt, cont = tokens
    ref = dense_tpla_logits(hf_model, prompt + cont[:-1], len(prompt), groups, norm, mu)
    assert close(got, ref) < TOL
    # TPLA is an approximation: away from the prompt it must differ from exact MLA (else the test is vacuous).
    exact = dense_tpla_logits(hf_model, prompt + cont[:-1], len(prompt), 1, "exact", torch.ones(layers, 1))
    assert close(ref[1:], exact[1:]) > 10 * TOL


def test_calibration_round_trip_and_mismatch(tiny_v3_dir, tiny_v2_dir, tmp_path):
    from tpla_serve.tools.calibrate import calibrate

    data = tmp_path / "calib.txt"
    data.write_text("def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n" * 8)
    calib = calibrate(str(tiny_v3_dir), str(data), groups=2, transform="pca", seq_len=64, max_tokens=256)
    path = tmp_path / "c.safetensors"
    calib.save(path)
    loaded = Calibration.load(path, calib.model_fingerprint, 2, "pca")
    assert torch.equal(loaded.mu, calib.mu) and len(loaded.bases) == len(calib.bases)
    for u in loaded.bases:  # orthonormal, columns by decreasing latent energy
        assert torch.allclose(u.T @ u, torch.eye(u.shape[0]), atol=1e-4)
    assert torch.isfinite(loaded.mu).all() and torch.allclose(loaded.mu[:, 0], torch.ones(len(calib.bases)), atol=0.5)

    with pytest.raises(ValueError, match="another model"):
        make_rank(tiny_v2_dir, tpla_groups=2, tp_size=2, tpla_transform="pca", tpla_calibration=str(path))
    with pytest.raises(ValueError, match="tpla_groups=2, not 1"):
        make_rank(tiny_v3_dir, tpla_transform="pca", tpla_calibration=str(path))
    with pytest.raises(ValueError, match="not hadamard"):
        make_rank(tiny_v3_dir, tpla_groups=1, tpla_transform="hadamard", tpla_calibration=str(path))
