"""The shipped target and draft: they load in transformers offline, have the promised shape, and model code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, DeepseekV3ForCausalLM

from training.data import encode_files

MODELS_DIR = Path(__file__).resolve().parents[2] / "models"
TARGET_DIR = MODELS_DIR / "mla-tiny"
DRAFT_DIR = MODELS_DIR / "mla-tiny-draft"
SHIPPED_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "README.md",
)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(TARGET_DIR))


@pytest.fixture(scope="module", params=[TARGET_DIR, DRAFT_DIR], ids=["target", "draft"])
def shipped(request) -> tuple[Path, DeepseekV3ForCausalLM]:
    model = AutoModelForCausalLM.from_pretrained(str(request.param), dtype=torch.float32)
    return request.param, model.eval()


def test_files_and_total_size() -> None:
    total = 0
    for directory in (TARGET_DIR, DRAFT_DIR):
        for name in SHIPPED_FILES:
            total += (directory / name).stat().st_size
        assert "perplexity" in (directory / "README.md").read_text().lower()
        generation = json.loads((directory / "generation_config.json").read_text())
        assert generation["eos_token_id"] == 1 and generation["bos_token_id"] == 0
    assert total <= 40 * 1024 * 1024


@pytest.mark.parametrize("directory", [TARGET_DIR, DRAFT_DIR], ids=["target", "draft"])
def test_config_is_mla_with_moe(directory: Path) -> None:
    c = json.loads((directory / "config.json").read_text())
    assert c["architectures"] == ["DeepseekV3ForCausalLM"] and c["model_type"] == "deepseek_v3"
    assert c["kv_lora_rank"] in (128, 256) and c["q_lora_rank"] is not None
    assert 32 <= c["qk_rope_head_dim"] <= 64
    assert 1 <= c["first_k_dense_replace"] < c["num_hidden_layers"] and c["n_routed_experts"] > 1
    assert (c["scoring_func"], c["topk_method"]) == ("sigmoid", "noaux_tc")
    assert c["vocab_size"] == 4096


@pytest.mark.parametrize("directory", [TARGET_DIR, DRAFT_DIR], ids=["target", "draft"])
def test_checkpoint_layout(directory: Path) -> None:
    c = json.loads((directory / "config.json").read_text())
    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        dtypes = {k: f.get_slice(k).get_dtype() for k in keys}
    moe_layers = range(c["first_k_dense_replace"], c["num_hidden_layers"])
    for layer in moe_layers:
        for expert in range(c["n_routed_experts"]):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                assert f"model.layers.{layer}.mlp.experts.{expert}.{proj}.weight" in keys
        assert dtypes[f"model.layers.{layer}.mlp.gate.e_score_correction_bias"] == "F32"
    assert not any(k.endswith("experts.gate_up_proj") for k in keys)
    assert all(d == "BF16" for k, d in dtypes.items() if not k.endswith("e_score_correction_bias"))


def test_logits_are_finite_and_beat_an_oracle_unigram_model(shipped, tokenizer, stdlib_split) -> None:
    """Reference: a context-free model given the true token frequencies of the very text it is scored on."""
    _, model = shipped
    ids = encode_files(tokenizer, stdlib_split.held_out[:3])[:513].unsqueeze(0)
    with torch.no_grad():
        logits = model(input_ids=ids[:, :-1]).logits
    assert torch.isfinite(logits).all()
    nll = torch.nn.functional.cross_entropy(logits[0], ids[0, 1:]).item()
    counts = torch.bincount(ids[0, 1:]).float()
    freqs = counts[counts > 0] / counts.sum()
    unigram_entropy = -(freqs * freqs.log()).sum().item()
    assert nll < unigram_entropy - 0.5


def test_target_continues_a_def_with_an_indented_body(tokenizer) -> None:
    model = AutoModelForCausalLM.from_pretrained(str(TARGET_DIR), dtype=torch.float32).eval()
    ids = tokenizer("def fibonacci(n):", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    continuation = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert continuation.startswith("\n    ")
