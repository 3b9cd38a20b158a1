"""Approximate per-worker prefix cache: a radix tree over request text, tagged with the workers that saw it.

It mirrors what each worker's own radix cache probably holds, so a request can be sent where its
prefix is already cached. Invariant: a node's tenants include every tenant of its children, and a
tenant's access tick on a node is >= its tick on any child, so evicting least-recently-used leaves
first never leaves a hole in a tenant's path.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator


class _Node:
    __slots__ = ("children", "label", "parent", "tenants")

    def __init__(self, label: str, parent: _Node | None) -> None:
        self.label = label
        self.children: dict[str, _Node] = {}
        self.parent = parent
        self.tenants: dict[str, int] = {}

    def is_tenant_leaf(self, tenant: str) -> bool:
        return tenant in self.tenants and not any(tenant in c.tenants for c in self.children.values())


def _common_prefix_len(label: str, text: str, start: int) -> int:
    """Length of the common prefix of `label` and `text[start:]`, by binary search on C-level compares."""
    if text.startswith(label, start):
        return len(label)
    lo, hi = 0, min(len(label), len(text) - start)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if text.startswith(label[:mid], start):
            lo = mid
        else:
            hi = mid - 1
    return lo


class PrefixTree:
    def __init__(self) -> None:
        self._root = _Node("", None)
        self._tick = 0
        self._sizes: dict[str, int] = {}

    def tenant_size(self, tenant: str) -> int:
        """Characters of text attributed to `tenant`."""
        return self._sizes.get(tenant, 0)

    def insert(self, text: str, tenant: str) -> None:
        self._tick += 1
        tick = self._tick
        size = self._sizes.get(tenant, 0)
        node = self._root
        node.tenants[tenant] = tick
        i = 0
        while i < len(text):
            child = node.children.get(text[i])
            if child is None:
                child = _Node(text[i:], node)
                node.children[text[i]] = child
            else:
                n = _common_prefix_len(child.label, text, i)
                if n < len(child.label):
                    child = self._split(child, n)
            if tenant not in child.tenants:
                size += len(child.label)
            child.tenants[tenant] = tick
            node = child
            i += len(child.label)
        self._sizes[tenant] = size

    def prefix_match(self, text: str, allowed: set[str]) -> tuple[int, str | None]:
        """Longest prefix of `text` held by a tenant in `allowed`: (matched chars, most recent such tenant)."""
        node = self._root
        best: tuple[int, str | None] = (0, None)
        i = 0
        while i < len(text):
            child = node.children.get(text[i])
            if child is None:
                break
            live = [t for t in child.tenants if t in allowed]
            if not live:
                break
            n = _common_prefix_len(child.label, text, i)
            best = (i + n, max(live, key=child.tenants.__getitem__))
            if n < len(child.label):
                break
            node = child
            i += n
        return best

    def evict(self, max_size: int) -> None:
        """Drop each oversized tenant's least recently used leaves until it holds at most `max_size` chars."""
        for tenant, size in list(self._sizes.items()):
            if size <= max_size:
                continue
            heap = [(n.tenants[tenant], id(n), n) for n in self._nodes() if n.is_tenant_leaf(tenant)]
            heapq.heapify(heap)
            while size > max_size and heap:
                _, _, node = heapq.heappop(heap)
                size -= len(node.label)
                parent = self._drop(node, tenant)
                if parent is not self._root and parent.is_tenant_leaf(tenant):
                    heapq.heappush(heap, (parent.tenants[tenant], id(parent), parent))
            self._sizes[tenant] = size

    def remove_tenant(self, tenant: str) -> None:
        for node in reversed(list(self._nodes())):
            if tenant in node.tenants:
                self._drop(node, tenant)
        self._root.tenants.pop(tenant, None)
        self._sizes.pop(tenant, None)

    def _drop(self, node: _Node, tenant: str) -> _Node:
        """Remove `tenant` from a node, pruning the node once nobody holds it; returns the parent."""
        parent = node.parent
        assert parent is not None, "the root is never dropped"
        del node.tenants[tenant]
        if not node.tenants and not node.children:
            del parent.children[node.label[0]]
        return parent

    def _split(self, child: _Node, n: int) -> _Node:
        parent = child.parent
        assert parent is not None
        mid = _Node(child.label[:n], parent)
        mid.tenants = dict(child.tenants)
        child.label = child.label[n:]
        child.parent = mid
        mid.children[child.label[0]] = child
        parent.children[mid.label[0]] = mid
        return mid

    def _nodes(self) -> Iterator[_Node]:
        """Every node but the root, parents before children."""
        stack = list(self._root.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())
