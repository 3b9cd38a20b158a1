"""Architecture registry: the HF `architectures` names a config.json may carry → our model classes.

Classes import lazily, so parsing a config does not pull in model code.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

from torch import nn

_ARCHITECTURES: Mapping[str, str] = MappingProxyType(
    {
        "DeepseekV2ForCausalLM": "tpla_serve.models.deepseek:DeepseekForCausalLM",
        "DeepseekV3ForCausalLM": "tpla_serve.models.deepseek:DeepseekForCausalLM",
    }
)

_BUILTIN_CONFIGS = ("deepseek-v2-lite", "deepseek-v3", "kimi-k2")


def supported_architectures() -> frozenset[str]:
    return frozenset(_ARCHITECTURES)


def get_model_class(architecture: str) -> type[nn.Module]:
    target = _ARCHITECTURES.get(architecture)
    if target is None:
        raise ValueError(
            f"unknown architecture {architecture!r}; supported: {', '.join(sorted(_ARCHITECTURES))}"
        )
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def builtin_config_names() -> tuple[str, ...]:
    return _BUILTIN_CONFIGS


def builtin_config(name: str) -> Path:
    """Path of a shipped config.json of a published model (for --load-format dummy at real shapes)."""
    if name not in _BUILTIN_CONFIGS:
        raise ValueError(f"unknown built-in config {name!r}; choose from {', '.join(_BUILTIN_CONFIGS)}")
    return Path(__file__).parent / "configs" / f"{name}.json"
