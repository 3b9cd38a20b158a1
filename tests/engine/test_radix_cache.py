"""The radix tree against a plain reference: a dict from every cached page's full token prefix to its page.

Random inserts, matches, locks, unlocks and evictions over a few shared prefixes. After every operation:
a match returns exactly the longest run of whole pages the reference holds for those tokens, every page
the tree owns is allocated and none is free, locked pages survive any eviction, and the counters (pages,
evictable pages) equal what a walk of the tree counts.
"""

from __future__ import annotations

import random

import pytest

from tpla_serve.cache.pool import PageAllocator
from tpla_serve.cache.radix_cache import RadixCache, RadixNode

PAGE = 4


def _walk(cache: RadixCache) -> dict[tuple[int, ...], int]:
    """Every cached page, keyed by the tokens from the root to the end of that page."""
    out: dict[tuple[int, ...], int] = {}
    todo: list[tuple[RadixNode, tuple[int, ...]]] = [(cache.root, ())]
    while todo:
        node, prefix = todo.pop()
        for i, page in enumerate(node.pages):
            out[prefix + node.tokens[: (i + 1) * PAGE]] = page
        for key, child in node.children.items():
            assert child.parent is node and child.tokens[:PAGE] == key and child.pages
            assert len(child.tokens) == len(child.pages) * PAGE
            assert child.lock_count <= node.lock_count or node is cache.root
            todo.append((child, prefix + node.tokens))
    return out


def _check(cache: RadixCache, allocator: PageAllocator, locked: list[tuple[RadixNode, list[int]]]) -> None:
    pages = _walk(cache)
    assert len(set(pages.values())) == len(pages) == cache.num_pages
    free = set(allocator._free)
    assert not free & set(pages.values()), "a cached page is also free"
    for _, held in locked:
        assert not free & set(held), "a page a request reads was freed"
    evictable = 0
    todo = [cache.root]
    while todo:
        node = todo.pop()
        todo.extend(node.children.values())
        if node is not cache.root and node.lock_count == 0:
            evictable += len(node.pages)
    assert cache.evictable_pages == evictable


def _expected_match(pages: dict[tuple[int, ...], int], tokens: list[int], max_tokens: int) -> list[int]:
    out = []
    for end in range(PAGE, min(max_tokens, len(tokens)) + 1, PAGE):
        page = pages.get(tuple(tokens[:end]))
        if page is None:
            break
        out.append(page)
    return out


@pytest.mark.parametrize("seed", range(6))
def test_random_operations_match_the_reference(seed: int) -> None:
    rng = random.Random(seed)
    allocator = PageAllocator(num_pages=48)
    cache = RadixCache(allocator, PAGE)
    stems = [[rng.randrange(3) for _ in range(rng.randrange(4, 24))] for _ in range(3)]
    locked: list[tuple[RadixNode, list[int]]] = []
    for _ in range(300):
        op = rng.random()
        tokens = rng.choice(stems)[: rng.randrange(0, 25)] + [rng.randrange(3) for _ in range(rng.randrange(0, 9))]
        if op < 0.45:  # a request runs: takes its prefix, computes the rest, inserts its whole pages
            before = _walk(cache)
            match = cache.match(tokens, len(tokens))
            assert match.pages == _expected_match(before, tokens, len(tokens))
            cache.lock(match.node)
            own = allocator.alloc(len(tokens) // PAGE - match.num_pages)
            if own is None:
                cache.unlock(match.node)
                continue
            node, adopted = cache.insert(tokens, match.pages + own)
            assert adopted == set(own)  # the tree had none of the new pages' tokens
            cache.lock(node)
            cache.unlock(match.node)
            locked.append((node, match.pages + own))
        elif op < 0.75 and locked:  # a request ends
            node, _ = locked.pop(rng.randrange(len(locked)))
            cache.unlock(node)
        elif op < 0.9:
            cache.evict(rng.randrange(1, 12))
        else:  # a shorter match cap: positions a request wants logits for are never taken from the cache
            cap = rng.randrange(0, len(tokens) + 1)
            assert cache.match(tokens, cap).pages == _expected_match(_walk(cache), tokens, cap)
        _check(cache, allocator, locked)
    for node, _ in locked:
        cache.unlock(node)
    assert cache.reset() > 0 and cache.num_pages == cache.evictable_pages == 0
    assert allocator.num_free == allocator.num_usable


def test_duplicate_pages_stay_the_requests() -> None:
    """Two requests that computed the same prompt at once: the tree keeps the first one's pages."""
    allocator = PageAllocator(num_pages=16)
    cache = RadixCache(allocator, PAGE)
    tokens = list(range(10))
    first, second = allocator.alloc(2), allocator.alloc(2)
    node_a, adopted_a = cache.insert(tokens, first)
    node_b, adopted_b = cache.insert(tokens, second)
    assert node_a is node_b and adopted_a == set(first) and adopted_b == set()
    assert cache.match(tokens + [99], 12).pages == first


def test_eviction_is_least_recently_used_and_spares_locked_nodes() -> None:
    allocator = PageAllocator(num_pages=16)
    cache = RadixCache(allocator, PAGE)
    old, mid, new = [1] * 8, [2] * 8, [3] * 8
    for tokens in (old, mid, new):
        cache.insert(tokens, allocator.alloc(2))
    held = cache.match(mid, 8)
    cache.lock(held.node)
    cache.match(old, 8)  # touched after `new`: `new` is now the least recently used unlocked leaf
    assert cache.evict(1) == 2
    assert cache.match(new, 8).pages == [] and len(cache.match(old, 8).pages) == 2
    assert cache.evict(100) == 2  # only `old` could go
    assert cache.match(mid, 8).pages == held.pages
