"""Tiny DeepSeek-V2/V3 checkpoints written by transformers itself, with a small byte-level BPE tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CORPUS = [
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "The quick brown fox jumps over the lazy dog. ",
    "import os\nimport sys\n\nclass Engine:\n    def __init__(self, path):\n        self.path = path\n",
    "Paged attention keeps the latent KV cache in fixed-size pages. Übermäßig café naïve 東京 ✓\n",
]


def build_tokenizer(directory: Path, vocab_size: int = 320):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<bos>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>")
    fast.save_pretrained(directory)
    return fast


def tiny_config(arch: str, vocab_size: int, **overrides):
    from transformers import DeepseekV2Config, DeepseekV3Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        n_shared_experts=1,
        n_routed_experts=8,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        max_position_embeddings=1024,
        initializer_range=0.1,
        bos_token_id=0,
        eos_token_id=1,
        tie_word_embeddings=False,
    )
    if arch == "v2":
        common.update(q_lora_rank=None, topk_method="group_limited_greedy", n_group=2, topk_group=1)
        cls = DeepseekV2Config
    else:
        common.update(q_lora_rank=24, n_group=2, topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.5)
        cls = DeepseekV3Config
    common.update(overrides)
    return cls(**common)


def write_tiny_model(directory: Path, arch: str = "v3", seed: int = 0, **overrides) -> Path:
    """A random transformers model saved as a sharded checkpoint, plus its tokenizer."""
    from transformers import DeepseekV2ForCausalLM, DeepseekV3ForCausalLM

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(directory)
    config = tiny_config(arch, len(tokenizer), **overrides)
    torch.manual_seed(seed)
    cls = DeepseekV2ForCausalLM if arch == "v2" else DeepseekV3ForCausalLM
    model = cls(config).eval()
    if arch == "v3":  # a nonzero routing bias exercises noaux_tc's corrected scores
        for layer in model.model.layers[config.first_k_dense_replace :]:
            layer.mlp.gate.e_score_correction_bias.normal_(0, 0.3)
    model.save_pretrained(directory, max_shard_size="200KB")
    return directory


@pytest.fixture(scope="session")
def tiny_v3_dir(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny-v3"), "v3")


@pytest.fixture(scope="session")
def tiny_v2_dir(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny-v2"), "v2")


@pytest.fixture(scope="session")
def hf_v3(tiny_v3_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_v3_dir, attn_implementation="eager", dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def engine_v3(tiny_v3_dir):
    from tpla_serve import Engine

    return Engine(model_path=str(tiny_v3_dir), dtype="float32", device="cpu", page_size=4)
