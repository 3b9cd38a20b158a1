"""The latent KV pool (ĉ and k_pe per token, per layer) and the allocator of its pages.

Layout per layer matches FlashInfer's MLA paged layout: ckv [num_pages, page_size, ckv_dim] and
kpe [num_pages, page_size, rope_dim]. A token's *slot* is page * page_size + offset. Page 0 is reserved
and never handed out, so padded page-table entries can point at it harmlessly.
"""

from __future__ import annotations

import copy

import torch


class PageAllocator:
    """Free list of KV pages. Invariant: every page in 1..num_pages-1 is free, owned by one request, or
    owned by the prefix cache."""

    def __init__(self, num_pages: int) -> None:
        if num_pages < 2:
            raise ValueError(f"the KV pool needs at least 2 pages (one is reserved), got {num_pages}")
        self.num_pages = num_pages
        self._free: list[int] = list(range(num_pages - 1, 0, -1))
        self._is_free = [False] + [True] * (num_pages - 1)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_usable(self) -> int:
        return self.num_pages - 1

    @property
    def num_used(self) -> int:
        return self.num_usable - self.num_free

    def alloc(self, n: int) -> list[int] | None:
        """n pages, or None (and nothing taken) when fewer than n are free."""
        if n > len(self._free):
            return None
        pages = [self._free.pop() for _ in range(n)]
        for p in pages:
            self._is_free[p] = False
        return pages

    def free(self, pages: list[int]) -> None:
        for p in pages:
            if p <= 0 or p >= self.num_pages or self._is_free[p]:
                raise RuntimeError(f"freeing page {p}, which is reserved or already free")
            self._is_free[p] = True
            self._free.append(p)


class LatentKVPool:
    """Preallocated per-layer pools of the normalized latent ĉ (ckv_dim wide) and the RoPE key k_pe."""

    def __init__(
        self,
        num_layers: int,
        num_pages: int,
        page_size: int,
        ckv_dim: int,
        rope_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        self.num_layers = num_layers
        self.num_pages = num_pages
        self.page_size = page_size
        self.ckv_dim = ckv_dim
        self.rope_dim = rope_dim
        self.dtype = dtype
        # One tensor per kind, layer-major: ckv[i] is a view of layer i, and consecutive layers together
        # form one pool of their pages (EasySpec's batched attention sublayers address it so).
        self.ckv_layers = torch.zeros(num_layers, num_pages, page_size, ckv_dim, dtype=dtype, device=device)
        self.kpe_layers = torch.zeros(num_layers, num_pages, page_size, rope_dim, dtype=dtype, device=device)
        self.ckv = list(self.ckv_layers.unbind(0))
        self.kpe = list(self.kpe_layers.unbind(0))

    def layer_range(self, first: int, n: int) -> LatentKVPool:
        """Layers first .. first+n-1 seen as the one layer of an n * num_pages-page pool (a view: writes go
        to this pool): page p of layer first + i is page p + i * num_pages. One attention call over it
        serves n layers at once, for a batch whose rows for layer first + i have their pages offset so."""
        if not (0 <= first and n >= 1 and first + n <= self.num_layers):
            raise ValueError(f"layers [{first}, {first + n}) are not within the pool's {self.num_layers}")
        view = copy.copy(self)
        view.num_layers, view.num_pages = 1, n * self.num_pages
        view.ckv_layers = self.ckv_layers[first : first + n].reshape(1, view.num_pages, self.page_size, -1)
        view.kpe_layers = self.kpe_layers[first : first + n].reshape(1, view.num_pages, self.page_size, -1)
        view.ckv, view.kpe = [view.ckv_layers[0]], [view.kpe_layers[0]]
        return view

    @staticmethod
    def bytes_per_token(num_layers: int, ckv_dim: int, rope_dim: int, dtype: torch.dtype) -> int:
        return num_layers * (ckv_dim + rope_dim) * torch.empty((), dtype=dtype).element_size()

    def write(self, layer: int, loc: torch.Tensor, ckv: torch.Tensor, kpe: torch.Tensor) -> None:
        """Store new tokens' ĉ [N, ckv_dim] and k_pe [N, rope_dim] at slots loc [N]."""
        self.ckv[layer].view(-1, self.ckv_dim).index_copy_(0, loc, ckv.to(self.dtype))
        self.kpe[layer].view(-1, self.rope_dim).index_copy_(0, loc, kpe.to(self.dtype))

    def read(self, layer: int, loc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather (ĉ, k_pe) of the tokens at slots loc."""
        return (
            self.ckv[layer].view(-1, self.ckv_dim).index_select(0, loc),
            self.kpe[layer].view(-1, self.rope_dim).index_select(0, loc),
        )
