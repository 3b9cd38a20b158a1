"""Paged latent KV cache: one preallocated pool per layer plus a page allocator."""

from tpla_serve.cache.pool import LatentKVPool, PageAllocator

__all__ = ["LatentKVPool", "PageAllocator"]
