"""Fast Walsh-Hadamard transform over the last dimension (Triton) and its torch reference.

TPLA rotates the latent space by a randomized Hadamard matrix before splitting it across groups; the
rotation is folded into weights at load time, and this kernel serves calibration and any runtime rotation.
The transform is the Sylvester-ordered H_n (H[i, j] = (-1)^popcount(i & j)), optionally scaled by
1/sqrt(n) so that it is orthonormal.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

_MAX_N = 1024
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _fwht_kernel(
    X, Out, num_rows, stride_x, stride_o, scale,
    N: tl.constexpr, LOG_N: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Butterflies in fp32 registers: stage i pairs elements 2^i apart, log2(N) stages in all."""
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.arange(0, N)
    mask = rows[:, None] < num_rows
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    for i in tl.static_range(LOG_N):
        x = tl.reshape(x, (BLOCK_M, N // (2 << i), 2, 1 << i))
        lo, hi = tl.split(tl.permute(x, (0, 1, 3, 2)))
        x = tl.permute(tl.join(lo + hi, lo - hi), (0, 1, 3, 2))
        x = tl.reshape(x, (BLOCK_M, N))
    tl.store(Out + rows[:, None] * stride_o + cols[None, :], (x * scale).to(Out.dtype.element_ty), mask=mask)


def _check(x: Tensor) -> int:
    n = x.shape[-1] if x.dim() > 0 else 0
    if x.dim() == 0 or n < 1 or n > _MAX_N or n & (n - 1):
        raise ValueError(f"x last dim must be a power of two in [1, {_MAX_N}], got shape {tuple(x.shape)}")
    if x.dtype not in _DTYPES:
        raise ValueError(f"x dtype must be one of {_DTYPES}, got {x.dtype}")
    return n


def hadamard_transform(x: Tensor, normalize: bool = True, out: Tensor | None = None) -> Tensor:
    """Return x @ H_n over the last dim (times 1/sqrt(n) when normalize), in x's dtype, fp32 inside.

    out may be x itself: each row is read whole before it is written.
    """
    n = _check(x)
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    elif out.shape != x.shape or out.dtype != x.dtype or out.device != x.device or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {x.dtype} tensor of shape {tuple(x.shape)} on {x.device}")
    if x.numel() == 0:
        return out
    rows = x.reshape(-1, n) if x.stride(-1) == 1 else x.contiguous().reshape(-1, n)
    dst = out.view(-1, n)
    block_m = max(1, min(triton.next_power_of_2(rows.shape[0]), 4096 // n))
    _fwht_kernel[(triton.cdiv(rows.shape[0], block_m),)](
        rows, dst, rows.shape[0], rows.stride(0), dst.stride(0), 1.0 / math.sqrt(n) if normalize else 1.0,
        N=n, LOG_N=n.bit_length() - 1, BLOCK_M=block_m, num_warps=4,
    )
    return out


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu") -> Tensor:
    """The Sylvester Hadamard matrix H_n (entries +-1), built by Kronecker doubling."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"n must be a power of two, got {n}")
    h = torch.ones(1, 1, dtype=dtype, device=device)
    base = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=dtype, device=device)
    while h.shape[0] < n:
        h = torch.kron(base, h)
    return h


def hadamard_transform_reference(x: Tensor, normalize: bool = True) -> Tensor:
    """Dense float64 product with H_n: the independent check of :func:`hadamard_transform`."""
    n = _check(x)
    y = x.double() @ hadamard_matrix(n, device=x.device)
    if normalize:
        y = y / math.sqrt(n)
    return y.to(x.dtype)
