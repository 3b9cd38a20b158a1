"""Tiling and KV-split choices for the paged decode kernel, from shapes alone.

The choices never read device memory, so a decode step that calls the kernel stays capturable in a CUDA
graph. The tables were picked by timing on an H100 (benchmarks/bench_decode_kernel.py, notes in
benchmarks/notes_kernel.md).
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class DecodeConfig(NamedTuple):
    """Tile sizes and launch parameters of the split kernel."""

    block_h: int
    block_n: int
    num_warps: int
    num_stages: int
    lazy_rescale: bool = False


_MAX_SPLITS = 64
_MIN_SPLIT_TOKENS = 256
_SPLIT_OVERHEAD_TOKENS = 128


def default_config(rows: int, ckv: int, dtype: torch.dtype) -> DecodeConfig:
    """Pick tiles: heads fill the M dimension of the matrix products (64 where there are enough rows)."""
    if dtype == torch.float32:
        return DecodeConfig(block_h=16, block_n=16 if ckv >= 256 else 32, num_warps=4, num_stages=1)
    if rows >= 64:
        if ckv >= 512:
            return DecodeConfig(block_h=64, block_n=32, num_warps=8, num_stages=2)
        return DecodeConfig(block_h=64, block_n=64, num_warps=8, num_stages=2)
    block_h = 16 if rows <= 16 else 32
    return DecodeConfig(block_h=block_h, block_n=32 if ckv >= 512 else 64, num_warps=4, num_stages=2)


def default_num_splits(batch: int, head_blocks: int, max_kv: int, num_sms: int) -> int:
    """Split the KV range so that the programs fill the GPU in few, even waves.

    Cost model: waves of programs times the tokens each program walks plus a fixed per-program overhead
    (prologue, epilogue and the merge's share); max_kv is the page table's capacity in tokens.
    """
    base = batch * head_blocks
    max_splits = max(1, min(_MAX_SPLITS, max_kv // _MIN_SPLIT_TOKENS))
    best, best_cost = 1, float("inf")
    for splits in range(1, max_splits + 1):
        waves = -(-base * splits // num_sms)
        cost = waves * (-(-max_kv // splits) + _SPLIT_OVERHEAD_TOKENS)
        if cost < best_cost:
            best, best_cost = splits, cost
    return best
