"""Build a model from a local checkpoint directory (config.json + *.safetensors) or with dummy weights.

Tensors are read lazily with safetensors' safe_open: each parameter's weight loader reads only the rows or
columns its shard needs. FP8 block-quantized checkpoints (DeepSeek-V3, Kimi-K2) are dequantized to the
target dtype tensor by tensor, on the target device.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm

from tpla_serve.config import LOAD_FORMATS
from tpla_serve.models.config import ModelConfig, QuantConfig
from tpla_serve.models.registry import get_model_class
from tpla_serve.models.weight_utils import CheckpointTensorError, LazyTensor, dequantize_fp8_blocks
from tpla_serve.tpla.calibration import Calibration
from tpla_serve.tpla.layout import ShardLayout
from tpla_serve.tpla.options import TPLAOptions
from tpla_serve.tpla.transforms import latent_rotations, weights_fingerprint

logger = logging.getLogger(__name__)

_INDEX_FILE = "model.safetensors.index.json"
_SCALE_SUFFIX = "_scale_inv"  # "<linear>.weight" is scaled by "<linear>.weight_scale_inv"


def load_model(
    model_path: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    load_format: str = "auto",
    layout: ShardLayout = ShardLayout(),
    seed: int = 0,
    config_overrides: Mapping[str, Any] | None = None,
    show_progress: bool = True,
    tpla: TPLAOptions = TPLAOptions(),
    transform: str = "none",
    calibration_path: str | None = None,
) -> nn.Module:
    """The model of a checkpoint directory, with its weights, ready for forward().

    model_path: a directory with config.json (+ *.safetensors unless dummy), or, for `dummy`, a config
    .json file itself (see tpla_serve.models.builtin_config). config_overrides replace config.json keys,
    e.g. {"num_hidden_layers": 2} to run a real config's shapes at a fraction of its depth.
    transform / calibration_path: the latent transform folded into the weights after loading and the
    file with PCA bases and logit scales μ (DESIGN §3); `model.fingerprint` names the untransformed weights.
    """
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format must be one of {', '.join(LOAD_FORMATS)}, got {load_format!r}")
    path = Path(model_path)
    if path.is_file():
        if load_format != "dummy":
            raise ValueError(f"{path} is a file; loading weights needs the checkpoint directory")
        config = ModelConfig.from_json_file(path, overrides=config_overrides)
    else:
        config = ModelConfig.from_pretrained_dir(path, overrides=config_overrides)
    model = get_model_class(config.architecture)(config, layout=layout, dtype=dtype, device=device, tpla=tpla)
    if load_format == "dummy":
        init_dummy_weights(model, config.initializer_range, seed)
    else:
        SafetensorsCheckpoint(path).load_into(model, config.quantization, device, dtype, show_progress)
    model.fingerprint = weights_fingerprint(config, model.fingerprint_probe())
    calibration = None
    if calibration_path is not None:
        calibration = Calibration.load(calibration_path, model.fingerprint, layout.latent_groups, transform)
    rotations = latent_rotations(transform, config.num_hidden_layers, config.kv_lora_rank, calibration)
    model.transform_latent(rotations, fold_norm=transform != "none", calibration=calibration)
    model.post_load_weights()
    return model.eval()


@torch.no_grad()
def init_dummy_weights(model: nn.Module, std: float, seed: int) -> None:
    """Random weights in place, on the parameters' own device: N(0, std²) matrices, unit norms, zero biases
    (and a zero routing correction bias). Each parameter draws from its own generator, seeded by `seed` and
    its name, so replicated parameters (and with them the fingerprint) are equal on every rank and in every
    TP layout; sharded ones differ between layouts. Dummy weights are for speed runs, not for text."""
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        elif name.endswith((".bias", "e_score_correction_bias")):
            param.zero_()
        else:
            digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
            gen = torch.Generator(device=param.device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)
            param.normal_(0.0, std, generator=gen)


class SafetensorsCheckpoint:
    """The tensors of a checkpoint directory and the file each one lives in."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise FileNotFoundError(f"model directory {self.directory} does not exist")
        index = self.directory / _INDEX_FILE
        self.tensor_files = self._read_index(index) if index.is_file() else self._scan_files()

    def _read_index(self, index: Path) -> dict[str, Path]:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index} is not a safetensors index (no 'weight_map'): {e}") from e
        files = {name: self.directory / file for name, file in weight_map.items()}
        for file in sorted(set(files.values())):
            if not file.is_file():
                raise FileNotFoundError(f"{index} lists {file.name}, which does not exist")
        return files

    def _scan_files(self) -> dict[str, Path]:
        files = sorted(self.directory.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors files in {self.directory}")
        tensor_files: dict[str, Path] = {}
        for file in files:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open handles are not iterable
                    if name in tensor_files:
                        raise ValueError(f"tensor {name!r} is in both {tensor_files[name]} and {file}")
                    tensor_files[name] = file
        return tensor_files

    def load_into(
        self,
        model: nn.Module,
        quant: QuantConfig | None,
        device: torch.device | str,
        dtype: torch.dtype,
        show_progress: bool = True,
    ) -> None:
        """Stream every tensor into model.load_weights(); fail naming file and tensor on any mismatch."""
        num_tensors = sum(1 for n in self.tensor_files if not n.endswith(_SCALE_SUFFIX))
        with (
            ExitStack() as stack,
            tqdm(
                total=num_tensors, desc="Loading safetensors", unit="tensor", disable=not show_progress
            ) as bar,
        ):
            handles: dict[Path, Any] = {}

            def handle(file: Path) -> Any:
                if file not in handles:
                    handles[file] = stack.enter_context(safe_open(file, framework="pt"))
                    bar.set_postfix_str(file.name)
                return handles[file]

            tensors = self._iter_tensors(handle, quant, device, dtype, bar)
            try:
                covered = model.load_weights(tensors)  # type: ignore[operator]
            except CheckpointTensorError as e:
                file = self.tensor_files.get(e.tensor, self.directory)
                raise CheckpointTensorError(e.tensor, f"{e.problem} (in {file})") from e
        missing = [n for n in model.checkpoint_tensor_names() if n not in covered]  # type: ignore[operator]
        if missing:
            more = f" and {len(missing) - 1} more, e.g. {missing[1:4]}" if len(missing) > 1 else ""
            raise ValueError(
                f"checkpoint {self.directory} lacks tensor {missing[0]!r}{more}: no safetensors file has it"
            )

    def _iter_tensors(
        self,
        handle: Any,
        quant: QuantConfig | None,
        device: torch.device | str,
        dtype: torch.dtype,
        bar: tqdm,
    ) -> Iterator[tuple[str, LazyTensor | torch.Tensor]]:
        for name in sorted(self.tensor_files, key=lambda n: (str(self.tensor_files[n]), n)):
            if name.endswith(_SCALE_SUFFIX):
                continue
            file = self.tensor_files[name]
            try:
                lazy = LazyTensor(handle(file), name)
            except Exception as e:  # safetensors raises its own error types for a name the file lacks
                raise CheckpointTensorError(name, f"cannot be read: {e}") from e
            scale_name = name + _SCALE_SUFFIX
            if scale_name in self.tensor_files:
                yield name, self._dequantize(name, lazy, scale_name, handle, quant, device, dtype)
            elif lazy.dtype_name.startswith("F8"):
                raise CheckpointTensorError(name, f"is FP8 but the checkpoint has no {scale_name!r}")
            else:
                yield name, lazy
            bar.update(1)

    def _dequantize(
        self,
        name: str,
        weight: LazyTensor,
        scale_name: str,
        handle: Any,
        quant: QuantConfig | None,
        device: torch.device | str,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        if quant is None:
            raise CheckpointTensorError(
                name, f"has a {scale_name!r} but config.json has no quantization_config.weight_block_size"
            )
        scale = LazyTensor(handle(self.tensor_files[scale_name]), scale_name).load()
        try:
            return dequantize_fp8_blocks(weight.load().to(device), scale, quant.weight_block_size, dtype)
        except ValueError as e:
            raise CheckpointTensorError(name, str(e)) from e
