"""Random paged MLA decode inputs shared by the CPU and GPU kernel tests."""

from __future__ import annotations

from typing import NamedTuple

import torch


class PagedCase(NamedTuple):
    q_nope: torch.Tensor
    q_pe: torch.Tensor
    ckv_cache: torch.Tensor
    kpe_cache: torch.Tensor
    page_table: torch.Tensor
    seq_lens: torch.Tensor


def make_paged_case(
    seq_lens: list[int],
    heads: int,
    q_len: int,
    ckv: int,
    page_size: int,
    dtype: torch.dtype,
    *,
    d_pe: int = 64,
    device: str = "cpu",
    generator: torch.Generator | None = None,
    shared_prefix_pages: int = 0,
) -> PagedCase:
    """Scatter each request's pages randomly over a pool with spare pages; unused table slots hold -1.

    With shared_prefix_pages > 0 every request starts with the same physical pages (a shared prefix).
    """
    pages_needed = [-(-n // page_size) for n in seq_lens]
    max_pages = max(pages_needed + [1]) + 1
    own = [max(0, p - shared_prefix_pages) for p in pages_needed]
    num_pages = shared_prefix_pages + sum(own) + 3
    perm = torch.randperm(num_pages, generator=generator).to(torch.int32)
    shared, pool = perm[:shared_prefix_pages], perm[shared_prefix_pages:]
    table = torch.full((len(seq_lens), max_pages), -1, dtype=torch.int32)
    offset = 0
    for b, (need, mine) in enumerate(zip(pages_needed, own)):
        prefix = shared[: need - mine]
        table[b, : need - mine] = prefix
        table[b, need - mine : need] = pool[offset : offset + mine]
        offset += mine

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(dtype)

    rows = q_len * heads
    return PagedCase(
        q_nope=randn(len(seq_lens), rows, ckv).to(device),
        q_pe=randn(len(seq_lens), rows, d_pe).to(device),
        ckv_cache=randn(num_pages, page_size, ckv).to(device),
        kpe_cache=randn(num_pages, page_size, d_pe).to(device),
        page_table=table.to(device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
    )


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64; NaN anywhere in a gives inf."""
    a64, b64 = a.double(), b.double()
    if not torch.isfinite(a64).all():
        return float("inf")
    return float((a64 - b64).norm() / b64.norm().clamp_min(1e-30))
