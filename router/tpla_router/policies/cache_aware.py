"""Prefix affinity with a load-balance escape hatch, in the manner of SGLang's cache_aware policy."""

from __future__ import annotations

from collections.abc import Sequence

from .base import Policy, W
from .prefix_tree import PrefixTree


class CacheAwarePolicy(Policy):
    """Send a request where its longest prefix was sent before, unless load is too uneven.

    Balanced load: if the best worker holds more than `cache_threshold` of the key's characters, pick
    it; otherwise pick the worker with the least cached text (most room to cache). Imbalanced load
    (max - min > abs_threshold and max > min * rel_threshold): pick the least loaded worker.
    """

    def __init__(
        self,
        cache_threshold: float,
        balance_abs_threshold: int,
        balance_rel_threshold: float,
        max_tree_size: int,
    ) -> None:
        self._cache_threshold = cache_threshold
        self._abs_threshold = balance_abs_threshold
        self._rel_threshold = balance_rel_threshold
        self._max_tree_size = max_tree_size
        self._tree = PrefixTree()

    def select(self, workers: Sequence[W], key: str | None) -> W:
        loads = [w.in_flight for w in workers]
        low, high = min(loads), max(loads)
        imbalanced = high - low > self._abs_threshold and high > low * self._rel_threshold
        if imbalanced or not key:
            chosen = min(workers, key=lambda w: w.in_flight)
        else:
            matched, tenant = self._tree.prefix_match(key, {w.url for w in workers})
            if tenant is not None and matched / len(key) > self._cache_threshold:
                chosen = next(w for w in workers if w.url == tenant)
            else:
                chosen = min(workers, key=lambda w: (self._tree.tenant_size(w.url), w.in_flight))
        if key:
            self._tree.insert(key, chosen.url)
        return chosen

    def on_worker_removed(self, url: str) -> None:
        self._tree.remove_tenant(url)

    def maintain(self) -> None:
        self._tree.evict(self._max_tree_size)
