"""The calibration file: per-layer PCA bases of the latent and per-group logit scales μ.

One safetensors file: tensors `basis.{layer}` ([r, r], columns = principal directions, largest variance
first; present for the pca transform) and `mu` ([layers, g]); metadata names the model fingerprint, the
group count and the transform the scales were fitted under. Loading checks all three against the
running configuration, so a file made for another model or another g is refused with a clear message.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

FORMAT_VERSION = "1"


@dataclass(frozen=True)
class Calibration:
    model_fingerprint: str
    groups: int
    transform: str  # the transform μ was fitted under (none | hadamard | pca)
    mu: torch.Tensor  # [layers, g] fp32
    bases: tuple[torch.Tensor, ...] = ()  # per layer [r, r] fp32 (pca only)

    def save(self, path: str | Path) -> None:
        tensors = {"mu": self.mu.float().contiguous()}
        tensors.update({f"basis.{i}": b.float().contiguous() for i, b in enumerate(self.bases)})
        meta = {
            "format_version": FORMAT_VERSION,
            "model_fingerprint": self.model_fingerprint,
            "tpla_groups": str(self.groups),
            "transform": self.transform,
        }
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path, model_fingerprint: str, groups: int, transform: str) -> Calibration:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"calibration file {path} does not exist")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"{path} is not a tpla-serve calibration file (format {meta.get('format_version')})")
            if meta["model_fingerprint"] != model_fingerprint:
                raise ValueError(
                    f"{path} was calibrated for another model (fingerprint {meta['model_fingerprint']}, "
                    f"this model is {model_fingerprint}); run python -m tpla_serve.tools.calibrate for it"
                )
            if meta["transform"] != transform:
                raise ValueError(
                    f"{path} holds logit scales fitted under --tpla-transform {meta['transform']}, "
                    f"not {transform}"
                )
            if int(meta["tpla_groups"]) != groups:
                raise ValueError(f"{path} was calibrated for tpla_groups={meta['tpla_groups']}, not {groups}")
            mu = f.get_tensor("mu")
            n_bases = sum(1 for k in f.keys() if k.startswith("basis."))
            bases = tuple(f.get_tensor(f"basis.{i}") for i in range(n_bases))
        if transform == "pca" and n_bases != mu.shape[0]:
            raise ValueError(f"{path} has {n_bases} PCA bases for {mu.shape[0]} layers")
        return cls(meta["model_fingerprint"], groups, transform, mu, bases)
