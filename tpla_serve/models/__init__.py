"""Model definitions and loading: config parsing, the architecture registry, the checkpoint loader."""

from tpla_serve.models.config import ModelConfig, QuantConfig
from tpla_serve.models.loader import LOAD_FORMATS, load_model
from tpla_serve.models.registry import (
    builtin_config,
    builtin_config_names,
    get_model_class,
    supported_architectures,
)

__all__ = [
    "LOAD_FORMATS",
    "ModelConfig",
    "QuantConfig",
    "builtin_config",
    "builtin_config_names",
    "get_model_class",
    "load_model",
    "supported_architectures",
]
