"""Prefix caching: a radix tree over whole KV pages, keyed by the token ids they hold (SGLang's RadixAttention).

An edge holds a run of whole pages: its tokens (a multiple of page_size) and their page ids. A request that
starts running takes the longest cached prefix of its tokens — whole pages only; the rest of a partial
page is recomputed — and locks the node it ends at: every page on the path from the root is then in use.
When its prompt is computed, its full prompt pages are inserted; the tree adopts the pages it did not have
(they are the tree's from then on, the request only reads them) and the request moves its lock to the new
node. Pages leave the tree only by eviction: least recently used leaves no request locks, when the
allocator runs short or on flush. A page is never freed while a request reads it.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field

from tpla_serve.cache.pool import PageAllocator


@dataclass(eq=False)
class RadixNode:
    tokens: tuple[int, ...] = ()  # the edge from the parent: whole pages of tokens
    pages: list[int] = field(default_factory=list)  # one page id per page_size tokens of `tokens`
    parent: RadixNode | None = None
    children: dict[tuple[int, ...], RadixNode] = field(default_factory=dict)  # by their first page's tokens
    lock_count: int = 0  # requests whose prefix ends at or below this node
    last_access: int = 0


@dataclass(frozen=True)
class PrefixMatch:
    """The cached prefix of a token sequence: its pages, in order, and the node it ends at (to lock)."""

    pages: list[int]
    node: RadixNode

    @property
    def num_pages(self) -> int:
        return len(self.pages)


class RadixCache:
    def __init__(self, allocator: PageAllocator, page_size: int) -> None:
        self.allocator = allocator
        self.page_size = page_size
        self.root = RadixNode()
        self.num_pages = 0  # pages the tree owns
        self.evictable_pages = 0  # of those, pages on nodes no request locks (free for new work)
        self._clock = itertools.count(1)

    # ------------------------------------------------------------ lookups

    def _page_keys(self, tokens: list[int], num_pages: int) -> list[tuple[int, ...]]:
        p = self.page_size
        return [tuple(tokens[i * p : (i + 1) * p]) for i in range(num_pages)]

    def match(self, tokens: list[int], max_tokens: int) -> PrefixMatch:
        """The longest cached prefix of tokens[:max_tokens], whole pages only (not locked yet)."""
        keys = self._page_keys(tokens, min(max_tokens, len(tokens)) // self.page_size)
        node, pages, i = self.root, [], 0
        now = next(self._clock)
        while i < len(keys):
            child = node.children.get(keys[i])
            if child is None:
                break
            edge = len(child.pages)
            same = 0
            while same < edge and i + same < len(keys) and self._edge_key(child, same) == keys[i + same]:
                same += 1
            if same < edge:  # the match ends inside this edge: split it there
                child = self._split(child, same)
            pages.extend(child.pages)
            child.last_access = now
            node, i = child, i + same
            if same < edge:
                break
        return PrefixMatch(pages, node)

    def _edge_key(self, node: RadixNode, page: int) -> tuple[int, ...]:
        p = self.page_size
        return node.tokens[page * p : (page + 1) * p]

    def _split(self, node: RadixNode, pages: int) -> RadixNode:
        """Cut node's edge after `pages` pages; returns the new upper node (which keeps node as a child)."""
        p = self.page_size
        assert node.parent is not None and 0 < pages < len(node.pages)
        upper = RadixNode(node.tokens[: pages * p], node.pages[:pages], node.parent, {},
                          node.lock_count, node.last_access)
        node.parent.children[node.tokens[:p]] = upper
        node.tokens, node.pages, node.parent = node.tokens[pages * p :], node.pages[pages:], upper
        upper.children[node.tokens[:p]] = node
        return upper

    # ------------------------------------------------------------ requests

    def lock(self, node: RadixNode) -> None:
        """A request reads every page from the root down to node."""
        while node is not self.root:
            if node.lock_count == 0:
                self.evictable_pages -= len(node.pages)
            node.lock_count += 1
            node = node.parent  # type: ignore[assignment]

    def unlock(self, node: RadixNode) -> None:
        while node is not self.root:
            node.lock_count -= 1
            if node.lock_count == 0:
                self.evictable_pages += len(node.pages)
            node = node.parent  # type: ignore[assignment]

    def insert(self, tokens: list[int], pages: list[int]) -> tuple[RadixNode, set[int]]:
        """Cache the whole pages of tokens (pages[i] holds page i). Returns the node the sequence ends at
        (unlocked) and the ids of the request's pages the tree adopted; where the tree already had a page
        for the same tokens, it keeps its own and the request's stays the request's."""
        keys = self._page_keys(tokens, min(len(pages), len(tokens) // self.page_size))
        node, i, adopted = self.root, 0, set()
        now = next(self._clock)
        while i < len(keys):
            child = node.children.get(keys[i])
            if child is None:
                new_pages = pages[i : len(keys)]
                leaf = RadixNode(tuple(t for k in keys[i:] for t in k), list(new_pages), node, {}, 0, now)
                node.children[keys[i]] = leaf
                adopted.update(new_pages)
                self.num_pages += len(new_pages)
                self.evictable_pages += len(new_pages)
                return leaf, adopted
            edge = len(child.pages)
            same = 0
            while same < edge and i + same < len(keys) and self._edge_key(child, same) == keys[i + same]:
                same += 1
            if same < edge:
                child = self._split(child, same)
            child.last_access = now
            node, i = child, i + same
        return node, adopted

    # ------------------------------------------------------------ eviction

    def evict(self, num_pages: int) -> int:
        """Give back at least num_pages pages (fewer if not enough are unlocked), least recently used leaves
        first; returns how many were freed."""
        leaves = [(n.last_access, id(n), n) for n in self._nodes() if self._evictable_leaf(n)]
        heapq.heapify(leaves)
        freed = 0
        while freed < num_pages and leaves:
            _, _, leaf = heapq.heappop(leaves)
            parent = leaf.parent
            assert parent is not None
            self.allocator.free(leaf.pages)
            freed += len(leaf.pages)
            self.num_pages -= len(leaf.pages)
            self.evictable_pages -= len(leaf.pages)
            del parent.children[leaf.tokens[: self.page_size]]
            if self._evictable_leaf(parent):
                heapq.heappush(leaves, (parent.last_access, id(parent), parent))
        return freed

    def _evictable_leaf(self, node: RadixNode) -> bool:
        return node is not self.root and not node.children and node.lock_count == 0

    def reset(self) -> int:
        """Evict everything no request locks (/flush_cache); returns the pages freed."""
        return self.evict(self.num_pages)

    def _nodes(self) -> list[RadixNode]:
        out, todo = [], [self.root]
        while todo:
            node = todo.pop()
            out.append(node)
            todo.extend(node.children.values())
        return out
