"""The model configuration, parsed from a checkpoint's raw config.json.

transformers' AutoConfig is deliberately not used: Kimi-K2 declares model_type `kimi_k2` with remote
code, and the DeepSeek checkpoints predate transformers' own classes. Both the original `rope_scaling`
dict (DeepSeek/Kimi checkpoints) and transformers 5's `rope_parameters` are understood.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from tpla_serve.layers.activation import SUPPORTED_ACTIVATIONS
from tpla_serve.layers.moe import RoutingConfig
from tpla_serve.layers.rotary import ROPE_TYPES, RopeParams
from tpla_serve.models.registry import supported_architectures

# Defaults where a config leaves a field out: those of DeepSeek's reference configuration classes (and of
# transformers' ports), which differ between V2 and V3.
_ARCH_DEFAULTS: Mapping[str, Mapping[str, Any]] = MappingProxyType(
    {
        "DeepseekV2ForCausalLM": {
            "topk_method": "greedy",
            "scoring_func": "softmax",
            "norm_topk_prob": False,
            "routed_scaling_factor": 1.0,
            "n_shared_experts": 2,
            "first_k_dense_replace": 0,
            "rope_interleave": True,
        },
        "DeepseekV3ForCausalLM": {
            "topk_method": "noaux_tc",
            "scoring_func": "sigmoid",
            "norm_topk_prob": True,
            "routed_scaling_factor": 2.5,
            "n_shared_experts": 1,
            "first_k_dense_replace": 3,
            "rope_interleave": True,
        },
    }
)


@dataclass(frozen=True)
class QuantConfig:
    """Block-quantized FP8 weights (DeepSeek-V3, Kimi-K2): w = fp8 · scale_inv per [bn, bk] block."""

    method: str
    weight_block_size: tuple[int, int]


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    kv_lora_rank: int
    q_lora_rank: int | None
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeParams
    rope_interleave: bool
    # MoE; n_routed_experts None means every layer is dense.
    n_routed_experts: int | None = None
    num_experts_per_tok: int = 1
    moe_intermediate_size: int = 0
    n_shared_experts: int = 0
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    topk_method: str = "greedy"
    scoring_func: str = "softmax"
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    # Everything else.
    hidden_act: str = "silu"
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    num_nextn_predict_layers: int = 0
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    torch_dtype: str | None = None
    quantization: QuantConfig | None = None
    source: str = "<dict>"

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(d_nope + d_rope), times YaRN's mscale(factor, mscale_all_dim)² where the config sets it."""
        return self.qk_head_dim**-0.5 * self.rope.softmax_mscale

    @property
    def max_context_len(self) -> int:
        return self.max_position_embeddings

    @property
    def is_moe(self) -> bool:
        return self.n_routed_experts is not None

    def is_moe_layer(self, layer: int) -> bool:
        return (
            self.n_routed_experts is not None
            and layer >= self.first_k_dense_replace
            and layer % self.moe_layer_freq == 0
        )

    @property
    def routing(self) -> RoutingConfig:
        if self.n_routed_experts is None:
            raise ValueError(f"{self.source}: the model has no routed experts")
        return RoutingConfig(
            num_experts=self.n_routed_experts,
            top_k=self.num_experts_per_tok,
            scoring_func=self.scoring_func,
            topk_method=self.topk_method,
            n_group=self.n_group,
            topk_group=self.topk_group,
            norm_topk_prob=self.norm_topk_prob,
            routed_scaling_factor=self.routed_scaling_factor,
        )

    @classmethod
    def from_dict(
        cls, raw: Mapping[str, Any], source: str = "<dict>", overrides: Mapping[str, Any] | None = None
    ) -> ModelConfig:
        """Parse a config.json dict; `overrides` replace top-level keys first (e.g. num_hidden_layers)."""
        return _parse(dict(raw) | dict(overrides or {}), source)

    @classmethod
    def from_json_file(cls, path: str | Path, overrides: Mapping[str, Any] | None = None) -> ModelConfig:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"model config {path} does not exist")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from e
        if not isinstance(raw, dict):
            raise ValueError(f"{path} must hold a JSON object")
        return cls.from_dict(raw, source=str(path), overrides=overrides)

    @classmethod
    def from_pretrained_dir(cls, path: str | Path, overrides: Mapping[str, Any] | None = None) -> ModelConfig:
        config_file = Path(path) / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"no config.json in model directory {path}")
        return cls.from_json_file(config_file, overrides)


class _Fields:
    """Typed access to a raw config dict; every error names the field and the file."""

    def __init__(self, raw: Mapping[str, Any], source: str, defaults: Mapping[str, Any]) -> None:
        self.raw, self.source, self.defaults = raw, source, defaults

    def error(self, field: str, problem: str) -> ValueError:
        return ValueError(f"{self.source}: field {field!r} {problem}")

    def get(self, field: str, default: Any = None) -> Any:
        value = self.raw.get(field)
        if value is None:
            return self.defaults.get(field, default)
        return value

    def integer(self, field: str, default: int | None = None, minimum: int = 1) -> int:
        value = self.get(field, default)
        if value is None:
            raise self.error(field, "is required")
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.error(field, f"must be an integer >= {minimum}, got {value!r}")
        return value

    def opt_int(self, field: str, minimum: int = 1) -> int | None:
        return None if self.raw.get(field) is None else self.integer(field, minimum=minimum)

    def number(self, field: str, default: float | None = None) -> float:
        value = self.get(field, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(field, f"must be a number, got {value!r}")
        return float(value)

    def boolean(self, field: str, default: bool) -> bool:
        value = self.get(field, default)
        if not isinstance(value, bool):
            raise self.error(field, f"must be true or false, got {value!r}")
        return value

    def string(self, field: str, default: str) -> str:
        value = self.get(field, default)
        if not isinstance(value, str):
            raise self.error(field, f"must be a string, got {value!r}")
        return value


def _parse(raw: dict[str, Any], source: str) -> ModelConfig:
    archs = raw.get("architectures")
    if not isinstance(archs, list) or not archs or not all(isinstance(a, str) for a in archs):
        raise ValueError(f"{source}: field 'architectures' must be a non-empty list of class names")
    supported = supported_architectures()
    arch = next((a for a in archs if a in supported), None)
    if arch is None:
        raise ValueError(
            f"{source}: unknown architecture {archs[0]!r}; supported: {', '.join(sorted(supported))}"
        )
    f = _Fields(raw, source, _ARCH_DEFAULTS.get(arch, {}))

    num_heads = f.integer("num_attention_heads")
    kv_heads = f.get("num_key_value_heads", num_heads)
    if kv_heads != num_heads:
        raise f.error(
            "num_key_value_heads", f"must equal num_attention_heads ({num_heads}) in MLA, got {kv_heads}"
        )
    hidden_act = f.string("hidden_act", "silu")
    if hidden_act not in SUPPORTED_ACTIVATIONS:
        raise f.error("hidden_act", f"{hidden_act!r} is not supported; choose from {SUPPORTED_ACTIVATIONS}")
    num_layers = f.integer("num_hidden_layers")
    max_pos = f.integer("max_position_embeddings", 2048)

    n_routed = f.opt_int("n_routed_experts")
    moe: dict[str, Any] = {}
    if n_routed is not None:
        moe = {
            "n_routed_experts": n_routed,
            "num_experts_per_tok": f.integer("num_experts_per_tok"),
            "moe_intermediate_size": f.integer("moe_intermediate_size"),
            "n_shared_experts": f.integer("n_shared_experts", minimum=0),
            "first_k_dense_replace": f.integer("first_k_dense_replace", minimum=0),
            "moe_layer_freq": f.integer("moe_layer_freq", 1),
            "topk_method": f.string("topk_method", "greedy"),
            "scoring_func": f.string("scoring_func", "softmax"),
            "n_group": f.integer("n_group", 1),
            "topk_group": f.integer("topk_group", 1),
            "norm_topk_prob": f.boolean("norm_topk_prob", False),
            "routed_scaling_factor": f.number("routed_scaling_factor", 1.0),
        }

    eos = raw.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    config = ModelConfig(
        architecture=arch,
        model_type=f.string("model_type", ""),
        vocab_size=f.integer("vocab_size"),
        hidden_size=f.integer("hidden_size"),
        intermediate_size=f.integer("intermediate_size"),
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        kv_lora_rank=f.integer("kv_lora_rank"),
        q_lora_rank=f.opt_int("q_lora_rank"),
        qk_nope_head_dim=f.integer("qk_nope_head_dim"),
        qk_rope_head_dim=f.integer("qk_rope_head_dim"),
        v_head_dim=f.integer("v_head_dim"),
        rms_norm_eps=f.number("rms_norm_eps", 1e-6),
        max_position_embeddings=max_pos,
        rope=_parse_rope(raw, f, max_pos),
        rope_interleave=f.boolean("rope_interleave", True),
        hidden_act=hidden_act,
        attention_bias=f.boolean("attention_bias", False),
        mlp_bias=f.boolean("mlp_bias", False),
        tie_word_embeddings=f.boolean("tie_word_embeddings", False),
        initializer_range=f.number("initializer_range", 0.02),
        num_nextn_predict_layers=f.integer("num_nextn_predict_layers", 0, minimum=0),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_id=eos_ids,
        torch_dtype=raw.get("torch_dtype") or raw.get("dtype"),
        quantization=_parse_quantization(raw, source),
        source=source,
        **moe,
    )
    if arch == "DeepseekV2ForCausalLM" and not config.rope_interleave:
        raise f.error("rope_interleave", "must be true for DeepseekV2ForCausalLM (its RoPE is interleaved)")
    if config.is_moe:
        try:
            config.routing  # noqa: B018 - validates the routing fields
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from e
    return config


def _parse_rope(raw: Mapping[str, Any], f: _Fields, max_pos: int) -> RopeParams:
    field = "rope_parameters" if raw.get("rope_parameters") is not None else "rope_scaling"
    params = raw.get(field) or {}
    if not isinstance(params, dict):
        raise f.error(field, f"must be an object, got {params!r}")
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise f.error(field, f"has rope type {rope_type!r}; supported: {', '.join(ROPE_TYPES)}")
    if rope_type == "default":
        return RopeParams(theta=float(theta))
    original_max = params.get("original_max_position_embeddings") or max_pos
    factor = params.get("factor")
    if factor is None:
        factor = max_pos / original_max
    # `x or default` mirrors the reference: a 0 here means "use the default".
    return RopeParams(
        rope_type="yarn",
        theta=float(theta),
        factor=float(factor),
        original_max_position_embeddings=int(original_max),
        beta_fast=float(params.get("beta_fast") or 32),
        beta_slow=float(params.get("beta_slow") or 1),
        mscale=params.get("mscale"),
        mscale_all_dim=params.get("mscale_all_dim"),
        attention_factor=params.get("attention_factor"),
        truncate=bool(params.get("truncate", True)),
    )


def _parse_quantization(raw: Mapping[str, Any], source: str) -> QuantConfig | None:
    q = raw.get("quantization_config")
    if q is None:
        return None
    if not isinstance(q, dict):
        raise ValueError(f"{source}: field 'quantization_config' must be an object")
    method = q.get("quant_method")
    if method != "fp8":
        raise ValueError(
            f"{source}: quantization_config.quant_method {method!r} is not supported (only 'fp8')"
        )
    if q.get("fmt", "e4m3") != "e4m3":
        raise ValueError(f"{source}: quantization_config.fmt {q.get('fmt')!r} is not supported (only 'e4m3')")
    block = q.get("weight_block_size")
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise ValueError(
            f"{source}: quantization_config.weight_block_size must be [rows, cols], got {block!r}"
        )
    return QuantConfig(method="fp8", weight_block_size=(block[0], block[1]))
