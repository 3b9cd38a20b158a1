"""Orthogonal transforms of the latent, folded into the weights at load time.

MLA is unchanged by any orthogonal U applied this way (DESIGN §3): first fold kv_a_layernorm's γ into
kv_b_proj's latent columns (then γ = 1), then rotate the latent, c' = Uᵀ c, by replacing kv_a_proj's latent
rows with Uᵀ W_DKV and kv_b_proj's latent columns with W_UKV U. RMSNorm sees the same norm (U is
orthogonal) and W_UKV U Uᵀ ĉ = W_UKV ĉ, so the exact model is unchanged; what changes is how the latent's
energy spreads across the dimensions that TPLA splits into groups.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import torch

from tpla_serve.config import TPLA_TRANSFORMS
from tpla_serve.tpla.calibration import Calibration

HADAMARD_SEED = 0x7A1A


def randomized_hadamard(n: int, seed: int = HADAMARD_SEED) -> torch.Tensor:
    """U = H_n · diag(±1) / sqrt(n), fp64: Sylvester's Hadamard matrix with randomly signed columns."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"the Hadamard transform needs a power-of-two kv_lora_rank, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], dim=1), torch.cat([h, -h], dim=1)], dim=0)
    gen = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n,), generator=gen, dtype=torch.int64).to(torch.float64) * 2 - 1
    return h * signs[None, :] / n**0.5


@torch.no_grad()
def fold_norm_and_rotate(
    kv_a_weight: torch.Tensor,
    kv_a_bias: torch.Tensor | None,
    norm_weight: torch.Tensor,
    kv_b_weight: torch.Tensor,
    rotation: torch.Tensor | None,
) -> None:
    """In place: kv_a_weight [r + d_r, hidden] (latent rows first), kv_b_weight [rows, r], norm γ [r].

    Afterwards γ = 1 and, when `rotation` (U, [r, r]) is given, the latent is c' = Uᵀ c.
    """
    r = norm_weight.shape[0]
    kv_b = kv_b_weight.double() * norm_weight.double()[None, :]
    norm_weight.fill_(1.0)
    if rotation is not None:
        u = rotation.double().to(kv_b.device)
        if u.shape != (r, r):
            raise ValueError(f"rotation must be [{r}, {r}], got {list(u.shape)}")
        kv_a_weight[:r].copy_((u.T @ kv_a_weight[:r].double()).to(kv_a_weight.dtype))
        if kv_a_bias is not None:
            kv_a_bias[:r].copy_((u.T @ kv_a_bias[:r].double()).to(kv_a_bias.dtype))
        kv_b = kv_b @ u
    kv_b_weight.copy_(kv_b.to(kv_b_weight.dtype))


def latent_rotations(
    transform: str, num_layers: int, kv_lora_rank: int, calibration: Calibration | None
) -> list[torch.Tensor | None]:
    """Per layer U, or None per layer for `none`."""
    if transform not in TPLA_TRANSFORMS:
        raise ValueError(f"tpla_transform must be one of {', '.join(TPLA_TRANSFORMS)}, got {transform!r}")
    if transform == "none":
        return [None] * num_layers
    if transform == "hadamard":
        u = randomized_hadamard(kv_lora_rank)
        return [u] * num_layers
    if calibration is None or not calibration.bases:
        raise ValueError("--tpla-transform pca needs --tpla-calibration: a file written by tpla_serve.tools.calibrate")
    return list(calibration.bases)


def weights_fingerprint(config: Any, probe: torch.Tensor) -> str:
    """Names a model: its config (a dataclass; where it was loaded from does not count) plus the bytes of
    one weight tensor, so two checkpoints of one architecture, or two dummy seeds, differ. Computed
    before any transform."""
    fields = {k: v for k, v in dataclasses.asdict(config).items() if k != "source"}
    h = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode())
    h.update(probe.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
