"""Model shapes for the trained models, as named presets, and their DeepseekV3Config.

The shapes keep what TPLA and the engine need from a real DeepSeek-V3: MLA with a low-rank query
(q_lora_rank), a latent KV of kv_lora_rank >= 128 (so g = 2 and g = 4 latent groups stay meaningful), a
decoupled RoPE part, dense first layers, then MoE layers with sigmoid scoring, group-limited top-k routing
(noaux_tc) and a shared expert.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

from transformers import DeepseekV3Config


@dataclass(frozen=True)
class ModelShape:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    first_k_dense_replace: int
    intermediate_size: int
    moe_intermediate_size: int
    n_routed_experts: int
    num_experts_per_tok: int
    n_group: int
    topk_group: int
    n_shared_experts: int
    q_lora_rank: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int

    def __post_init__(self) -> None:
        for f in fields(self):
            if getattr(self, f.name) < 1:
                raise ValueError(f"{f.name}: must be >= 1, got {getattr(self, f.name)}")
        if self.first_k_dense_replace >= self.num_hidden_layers:
            raise ValueError("first_k_dense_replace: must leave at least one MoE layer")
        if self.n_routed_experts % self.n_group:
            raise ValueError(
                f"n_group: {self.n_group} does not divide n_routed_experts {self.n_routed_experts}"
            )
        if self.topk_group > self.n_group:
            raise ValueError(f"topk_group: {self.topk_group} exceeds n_group {self.n_group}")
        if self.num_experts_per_tok > self.topk_group * (self.n_routed_experts // self.n_group):
            raise ValueError("num_experts_per_tok: more than the experts in the top groups")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim: must be even, got {self.qk_rope_head_dim}")


PRESETS: dict[str, ModelShape] = {
    "target": ModelShape(
        hidden_size=256,
        num_hidden_layers=8,
        num_attention_heads=8,
        first_k_dense_replace=2,
        intermediate_size=768,
        moe_intermediate_size=160,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=2,
        n_shared_experts=1,
        q_lora_rank=192,
        kv_lora_rank=256,
        qk_nope_head_dim=64,
        qk_rope_head_dim=32,
        v_head_dim=64,
    ),
    "draft": ModelShape(
        hidden_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        first_k_dense_replace=1,
        intermediate_size=384,
        moe_intermediate_size=96,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=2,
        n_shared_experts=1,
        q_lora_rank=96,
        kv_lora_rank=128,
        qk_nope_head_dim=32,
        qk_rope_head_dim=32,
        v_head_dim=32,
    ),
    "smoke": ModelShape(
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        first_k_dense_replace=1,
        intermediate_size=128,
        moe_intermediate_size=32,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        n_shared_experts=1,
        q_lora_rank=32,
        kv_lora_rank=128,
        qk_nope_head_dim=16,
        qk_rope_head_dim=32,
        v_head_dim=16,
    ),
}
# A deeper target for speculative decoding: twice the shipped target's layers and 1.5x its width, so a draft
# step of the 6-layer draft costs a small fraction of a target step. 46.4M parameters (93 MB in bf16); same
# tokenizer, so models/mla-tiny-draft drafts for it.
PRESETS["target-deep"] = replace(
    PRESETS["target"], hidden_size=384, num_hidden_layers=16, intermediate_size=1152, moe_intermediate_size=192
)


def build_config(
    shape: ModelShape,
    vocab_size: int,
    max_position_embeddings: int,
    bos_token_id: int,
    eos_token_id: int,
    pad_token_id: int,
    rope_theta: float = 10000.0,
) -> DeepseekV3Config:
    """A DeepseekV3Config with V3's routing semantics (sigmoid, noaux_tc, scaled, normalized top-k)."""
    return DeepseekV3Config(
        vocab_size=vocab_size,
        num_key_value_heads=shape.num_attention_heads,
        max_position_embeddings=max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        rope_interleave=True,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        scoring_func="sigmoid",
        topk_method="noaux_tc",
        hidden_act="silu",
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        num_nextn_predict_layers=0,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        **asdict(shape),
    )
