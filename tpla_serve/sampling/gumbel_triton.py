"""Fused Gumbel-max draw for CUDA: the counter hash, the noise and the argmax in one pass over the
logits, instead of ~30 elementwise launches over [B, V] int64 tensors.

Bit-for-bit the same hash as `sampler.noise_bits` (uint32 arithmetic wraps natively here) and the same
fp64 noise, so it draws the same tokens as the torch definition.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_CHUNK = 4096  # vocabulary entries per program
_BLOCK = 1024


@triton.jit
def _rotl(x, r: tl.constexpr):
    return (x << r) | (x >> (32 - r))


@triton.jit
def _scramble(k):
    return _rotl(k * 0xCC9E2D51, 15) * 0x1B873593


@triton.jit
def _absorb(h, k):
    return _rotl(h ^ _scramble(k), 13) * 5 + 0xE6546B64


@triton.jit
def _fmix(h):
    h = h ^ (h >> 16)
    h = h * 0x85EBCA6B
    h = h ^ (h >> 13)
    h = h * 0xC2B2AE35
    return h ^ (h >> 16)


@triton.jit
def _gumbel_argmax_kernel(
    Z,
    SeedLo,
    SeedHi,
    Steps,
    PartVal,
    PartIdx,
    V,
    stride_z,
    n_chunks,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Program (row, chunk): max and first argmax of z + gumbel over CHUNK vocabulary entries."""
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    zero = tl.zeros((), dtype=tl.uint32)
    h_row = _absorb(zero, tl.load(SeedLo + row).to(tl.uint32))
    h_row = _absorb(h_row, tl.load(SeedHi + row).to(tl.uint32))
    h_row = _absorb(h_row, tl.load(Steps + row).to(tl.uint32))
    best_val = tl.full((), float("-inf"), tl.float64)
    best_idx = tl.full((), 0, tl.int64)
    for start in tl.range(chunk * CHUNK, chunk * CHUNK + CHUNK, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < V
        z = tl.load(Z + row.to(tl.int64) * stride_z + cols, mask=mask, other=float("-inf"))
        h = _fmix((_rotl(h_row ^ _scramble(cols.to(tl.uint32)), 13) * 5 + 0xE6546B64) ^ 16)
        u = (h.to(tl.float64) + 0.5) * 2.3283064365386963e-10
        score = z.to(tl.float64) - tl.log(-tl.log(u))
        score = tl.where(mask, score, float("-inf"))
        val, idx = tl.max(score, axis=0, return_indices=True, return_indices_tie_break_left=True)
        best_idx = tl.where(val > best_val, (start + idx).to(tl.int64), best_idx)
        best_val = tl.maximum(val, best_val)
    tl.store(PartVal + row * n_chunks + chunk, best_val)
    tl.store(PartIdx + row * n_chunks + chunk, best_idx)


def gumbel_argmax_cuda(
    scaled: torch.Tensor, seeds_lo: torch.Tensor, seeds_hi: torch.Tensor, steps: torch.Tensor
) -> torch.Tensor:
    """[B] int64 token ids; `scaled` is fp32 [B, V] with unit stride along V (-inf = excluded)."""
    if scaled.dtype != torch.float32 or scaled.stride(1) != 1:
        scaled = scaled.float().contiguous()
    b, v = scaled.shape
    n_chunks = triton.cdiv(v, _CHUNK)
    part_val = torch.empty((b, n_chunks), dtype=torch.float64, device=scaled.device)
    part_idx = torch.empty((b, n_chunks), dtype=torch.int64, device=scaled.device)
    _gumbel_argmax_kernel[(b, n_chunks)](
        scaled,
        seeds_lo,
        seeds_hi,
        steps,
        part_val,
        part_idx,
        v,
        scaled.stride(0),
        n_chunks,
        CHUNK=_CHUNK,
        BLOCK=_BLOCK,
    )
    return part_idx.gather(1, part_val.argmax(dim=1, keepdim=True)).squeeze(1)
