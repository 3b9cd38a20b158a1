"""Decode attention kernels for MLA and TPLA (Triton) and their torch references.

Names resolve lazily: importing the package does not import Triton, and
`tpla_kernels.reference` works where Triton is missing.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "mla_decode": "tpla_kernels.decode",
    "DecodeConfig": "tpla_kernels.decode_config",
    "hadamard_transform": "tpla_kernels.hadamard",
    "hadamard_matrix": "tpla_kernels.hadamard",
    "hadamard_transform_reference": "tpla_kernels.hadamard",
    "mla_decode_reference": "tpla_kernels.reference",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'tpla_kernels' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
