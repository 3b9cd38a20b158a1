"""Checks of a launch's model that read only its config.json, so a wrong flag fails before anything starts."""

from __future__ import annotations

from pathlib import Path

from tpla_serve.config import EngineConfig
from tpla_serve.models.config import ModelConfig


def read_model_config(config: EngineConfig) -> ModelConfig:
    path = Path(config.model_path)
    if path.is_file():  # --load-format dummy at a shipped config file
        return ModelConfig.from_json_file(path, overrides=config.model_overrides)
    return ModelConfig.from_pretrained_dir(path, overrides=config.model_overrides)


def check_checkpoint(config: EngineConfig) -> None:
    """--quantization fp8 selects the block-FP8 path, which the checkpoint must be made for (ValueError).

    Without the flag the checkpoint's quantization_config decides, as in SGLang; the loader dequantizes
    block-FP8 weights either way.
    """
    if config.quantization is None:
        return
    try:
        model = read_model_config(config)
    except FileNotFoundError as e:
        raise ValueError(f"--model-path: {e}") from None
    if model.quantization is None or model.quantization.method != config.quantization:
        raise ValueError(
            f"--quantization {config.quantization}: {config.model_path} is not a block-FP8 checkpoint (its "
            "config.json has no quantization_config with quant_method fp8 and weight_block_size); leave the "
            "flag out to load it as it is"
        )
