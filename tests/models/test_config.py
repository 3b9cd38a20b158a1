"""ModelConfig parsing: the shipped published configs, both RoPE spellings, RoPE/YaRN numbers against
transformers' own implementation, and errors that name the field and file."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import DeepseekV2Config, DeepseekV3Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.deepseek_v3.modeling_deepseek_v3 import yarn_apply_mscale

from tpla_serve.layers.rotary import RotaryEmbedding, compute_inv_freq
from tpla_serve.models import ModelConfig, builtin_config, builtin_config_names

HF_CONFIG_CLASS = {"DeepseekV2ForCausalLM": DeepseekV2Config, "DeepseekV3ForCausalLM": DeepseekV3Config}


def _raw(name: str) -> dict:
    return json.loads(builtin_config(name).read_text())


def _write(tmp_path: Path, raw: dict) -> Path:
    (tmp_path / "config.json").write_text(json.dumps(raw))
    return tmp_path


def test_deepseek_v2_lite() -> None:
    c = ModelConfig.from_json_file(builtin_config("deepseek-v2-lite"))
    assert c.architecture == "DeepseekV2ForCausalLM"
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.vocab_size) == (2048, 27, 16, 102400)
    assert (c.q_lora_rank, c.kv_lora_rank, c.qk_head_dim, c.v_head_dim) == (None, 512, 192, 128)
    assert (c.n_routed_experts, c.num_experts_per_tok, c.n_shared_experts, c.moe_intermediate_size) == (
        64,
        6,
        2,
        1408,
    )
    assert (c.scoring_func, c.topk_method, c.norm_topk_prob) == ("softmax", "greedy", False)
    assert [c.is_moe_layer(i) for i in range(3)] == [False, True, True]
    assert c.rope.rope_type == "yarn" and c.rope.factor == 40 and c.rope_interleave
    mscale = 0.1 * 0.707 * math.log(40) + 1.0
    assert c.softmax_scale == pytest.approx(192**-0.5 * mscale**2, rel=1e-12)
    assert c.max_context_len == 163840 and c.quantization is None


def test_deepseek_v3_and_kimi_k2() -> None:
    v3 = ModelConfig.from_json_file(builtin_config("deepseek-v3"))
    assert (v3.hidden_size, v3.num_hidden_layers, v3.num_attention_heads, v3.q_lora_rank) == (
        7168,
        61,
        128,
        1536,
    )
    assert (v3.n_routed_experts, v3.num_experts_per_tok, v3.n_group, v3.topk_group) == (256, 8, 8, 4)
    assert (v3.scoring_func, v3.topk_method, v3.routed_scaling_factor, v3.vocab_size) == (
        "sigmoid",
        "noaux_tc",
        2.5,
        129280,
    )
    assert [v3.is_moe_layer(i) for i in (0, 2, 3, 60)] == [False, False, True, True]
    assert v3.quantization is not None and v3.quantization.weight_block_size == (128, 128)
    assert v3.num_nextn_predict_layers == 1
    kimi = ModelConfig.from_json_file(builtin_config("kimi-k2"))
    assert kimi.architecture == "DeepseekV3ForCausalLM" and kimi.model_type == "kimi_k2"
    assert (kimi.n_routed_experts, kimi.num_attention_heads, kimi.num_hidden_layers, kimi.vocab_size) == (
        384,
        64,
        61,
        163840,
    )
    assert (kimi.first_k_dense_replace, kimi.n_group, kimi.routed_scaling_factor) == (1, 1, 2.827)
    assert kimi.rope.theta == 50000.0 and kimi.rope.factor == 32.0


@pytest.mark.parametrize("name", builtin_config_names())
def test_rope_matches_transformers(name: str) -> None:
    """inv_freq, cos/sin attention factor and softmax scale equal transformers' for the real configs."""
    raw = _raw(name)
    ours = ModelConfig.from_dict(raw)
    hf_config = HF_CONFIG_CLASS[ours.architecture](**raw)
    hf_inv_freq, hf_factor = ROPE_INIT_FUNCTIONS["yarn"](hf_config)
    assert torch.equal(compute_inv_freq(ours.rope, ours.qk_rope_head_dim), hf_inv_freq)
    assert ours.rope.cos_sin_scale == hf_factor
    hf_scale = yarn_apply_mscale(hf_config.rope_parameters, hf_config.qk_head_dim**-0.5)
    assert ours.softmax_scale == pytest.approx(hf_scale, rel=1e-15)


@pytest.mark.parametrize(
    "rope",
    [
        {
            "type": "yarn",
            "factor": 8,
            "original_max_position_embeddings": 512,
            "mscale": 1.0,
            "mscale_all_dim": 0.5,
        },
        {"type": "yarn", "factor": 8, "original_max_position_embeddings": 512, "mscale_all_dim": 0.8},
        {
            "type": "yarn",
            "factor": 8,
            "original_max_position_embeddings": 512,
            "beta_fast": 16,
            "beta_slow": 2,
        },
        {"type": "yarn", "factor": 8, "original_max_position_embeddings": 512, "attention_factor": 1.3},
    ],
)
def test_yarn_variants_match_transformers(rope: dict) -> None:
    raw = _raw("deepseek-v3") | {"rope_scaling": rope, "max_position_embeddings": 4096}
    ours = ModelConfig.from_dict(raw)
    hf_config = DeepseekV3Config(**raw)
    hf_inv_freq, hf_factor = ROPE_INIT_FUNCTIONS["yarn"](hf_config)
    assert torch.equal(compute_inv_freq(ours.rope, 64), hf_inv_freq)
    assert ours.rope.cos_sin_scale == pytest.approx(hf_factor, rel=1e-15)
    assert ours.softmax_scale == pytest.approx(
        yarn_apply_mscale(hf_config.rope_parameters, hf_config.qk_head_dim**-0.5), rel=1e-15
    )
    cos, _ = RotaryEmbedding(64, ours.rope, interleaved=True).cos_sin(torch.tensor([0]))
    assert torch.allclose(cos, torch.full_like(cos, hf_factor))


@pytest.mark.parametrize("name", builtin_config_names())
def test_rope_parameters_spelling_equals_rope_scaling(name: str, tmp_path: Path) -> None:
    """transformers 5 writes `rope_parameters` (theta inside); the checkpoints write `rope_scaling`."""
    raw = _raw(name)
    hf_config = HF_CONFIG_CLASS[raw["architectures"][0]](**raw)
    hf_config.save_pretrained(tmp_path)
    rewritten = json.loads((tmp_path / "config.json").read_text())
    assert "rope_parameters" in rewritten
    assert ModelConfig.from_pretrained_dir(tmp_path).rope == ModelConfig.from_dict(raw).rope


def test_default_rope_and_defaults_by_architecture() -> None:
    raw = _raw("deepseek-v3")
    for key in ("rope_scaling", "topk_method", "scoring_func", "norm_topk_prob"):
        raw.pop(key)
    c = ModelConfig.from_dict(raw)
    assert c.rope.rope_type == "default" and c.softmax_scale == 192**-0.5
    assert (c.topk_method, c.scoring_func, c.norm_topk_prob) == ("noaux_tc", "sigmoid", True)
    assert torch.equal(
        compute_inv_freq(c.rope, 64), 1.0 / (10000 ** (torch.arange(0, 64, 2, dtype=torch.float) / 64))
    )


def test_moe_layer_freq_and_overrides() -> None:
    c = ModelConfig.from_dict(
        _raw("deepseek-v2-lite"), overrides={"moe_layer_freq": 2, "num_hidden_layers": 6}
    )
    assert c.num_hidden_layers == 6
    assert [c.is_moe_layer(i) for i in range(6)] == [False, False, True, False, True, False]


def test_unknown_architecture_names_it_and_the_file(tmp_path: Path) -> None:
    _write(tmp_path, _raw("deepseek-v3") | {"architectures": ["LlamaForCausalLM"]})
    with pytest.raises(ValueError, match=r"config\.json.*unknown architecture 'LlamaForCausalLM'"):
        ModelConfig.from_pretrained_dir(tmp_path)


@pytest.mark.parametrize(
    "change, field",
    [
        ({"hidden_size": None}, "hidden_size"),
        ({"kv_lora_rank": "512"}, "kv_lora_rank"),
        ({"num_key_value_heads": 1}, "num_key_value_heads"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"norm_topk_prob": "yes"}, "norm_topk_prob"),
        ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling"),
        ({"quantization_config": {"quant_method": "awq"}}, "quant_method"),
        ({"topk_group": 9}, "topk_group"),
        ({"topk_method": "sampled"}, "topk_method"),
    ],
)
def test_bad_fields_name_field_and_file(tmp_path: Path, change: dict, field: str) -> None:
    _write(tmp_path, _raw("deepseek-v3") | change)
    with pytest.raises(ValueError, match=field) as info:
        ModelConfig.from_pretrained_dir(tmp_path)
    assert "config.json" in str(info.value)


def test_missing_config_json(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=f"no config.json in model directory {tmp_path}"):
        ModelConfig.from_pretrained_dir(tmp_path)
