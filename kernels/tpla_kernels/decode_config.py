"""Tiling and KV-split choices for the paged decode kernel, from shapes alone.

The choices never read device memory, so a decode step that calls the kernel stays capturable in a CUDA
graph. The table was picked by timing candidates on the GPU (benchmarks/bench_decode_kernel.py --tune;
notes in benchmarks/notes_kernel.md).
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class DecodeConfig(NamedTuple):
    """Tile sizes and launch parameters of the split kernel.

    ctas_per_sm: how many programs of this tiling one SM holds at once (registers and shared memory);
    the KV split count is planned for that many resident programs per SM.
    tma: load whole KV blocks with TMA (16-bit contiguous pools whose page size block_n divides; other
    pools fall back to pointer gathers).
    """

    block_h: int
    block_n: int
    num_warps: int
    num_stages: int
    ctas_per_sm: int = 1
    tma: bool = False


_MAX_SPLITS = 64
_MIN_SPLIT_TOKENS = 256
_SPLIT_OVERHEAD_TOKENS = 128

# (query-row class, ckv class) -> tiling for 16-bit inputs. Row classes: <=16, <64, <128, >=128 rows.
# Timed on an H200 (triton 3.6) at B=32, 16K context (benchmarks/bench_decode_kernel.py --tune); the 32-row
# class is timed at 512 only (32 heads x 512: MLA at TP=4). TMA block loads win only at ckv 512.
_TABLE: dict[tuple[int, int], DecodeConfig] = {
    (16, 128): DecodeConfig(16, 128, 4, 3, 2),
    (16, 256): DecodeConfig(16, 64, 4, 3, 2),
    (16, 512): DecodeConfig(16, 32, 4, 3, 2),
    (32, 128): DecodeConfig(32, 64, 4, 3, 2),
    (32, 256): DecodeConfig(32, 64, 4, 3, 2),
    (32, 512): DecodeConfig(32, 32, 4, 3, 1),
    (64, 128): DecodeConfig(64, 64, 4, 3, 2),
    (64, 256): DecodeConfig(64, 32, 4, 3, 2),
    (64, 512): DecodeConfig(64, 64, 8, 2, 1, tma=True),
    (128, 128): DecodeConfig(128, 128, 8, 3, 1),
    (128, 256): DecodeConfig(128, 64, 8, 3, 1),
    (128, 512): DecodeConfig(64, 64, 8, 2, 1, tma=True),
}


def shape_class(rows: int, ckv: int) -> tuple[int, int]:
    """The table key of a (query rows, ckv) shape."""
    row_class = 16 if rows <= 16 else 32 if rows < 64 else 64 if rows < 128 else 128
    ckv_class = 512 if ckv >= 512 else 256 if ckv >= 256 else 128
    return row_class, ckv_class


def default_config(rows: int, ckv: int, dtype: torch.dtype) -> DecodeConfig:
    """Pick tiles: heads fill the M dimension of the matrix products (64 or 128 where there are enough)."""
    if dtype == torch.float32:
        return DecodeConfig(block_h=16, block_n=16 if ckv >= 256 else 32, num_warps=4, num_stages=2)
    return _TABLE[shape_class(rows, ckv)]


def default_num_splits(batch: int, head_blocks: int, max_kv: int, slots: int) -> int:
    """Split the KV range so that the programs fill the GPU's program slots in few, even waves.

    slots: programs resident at once (SMs x programs per SM). Cost model: waves of programs times the
    tokens each program walks plus a fixed per-program overhead (prologue, epilogue and the merge's share);
    max_kv is the page table's capacity in tokens.
    """
    base = batch * head_blocks
    max_splits = max(1, min(_MAX_SPLITS, max_kv // _MIN_SPLIT_TOKENS))
    best, best_cost = 1, float("inf")
    for splits in range(1, max_splits + 1):
        waves = -(-base * splits // slots)
        cost = waves * (-(-max_kv // splits) + _SPLIT_OVERHEAD_TOKENS)
        if cost < best_cost:
            best, best_cost = splits, cost
    return best
