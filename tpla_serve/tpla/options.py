"""How a rank computes TPLA attention (the math choices DESIGN §3 leaves open)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TPLAOptions:
    norm: str = "exact"  # exact: global RMSNorm of the full latent, then slice; local: RMSNorm per slice
    pd_sep: bool = True  # prompt tokens run exact MLA (their cache is exact); False: TPLA for them too

    def __post_init__(self) -> None:
        if self.norm not in ("exact", "local"):
            raise ValueError(f"tpla_norm must be exact or local, got {self.norm!r}")
