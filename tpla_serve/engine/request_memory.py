"""What a request holds of the KV cache: its pages (host allocator), its row of the request table, and
with prefix caching the cached prefix it reads.

One place keeps them in step: pages a request takes are written into its table row; a cached prefix is
locked while the request runs; giving a request's memory back frees the pages it owns (not the tree's),
unlocks its prefix and frees its row, so the device never reads a page the allocator could hand out again
while the request still runs. When the pool runs short, unlocked cached pages are evicted first.
"""

from __future__ import annotations

from tpla_serve.cache.pool import PageAllocator
from tpla_serve.cache.radix_cache import RadixCache
from tpla_serve.engine.request import Request
from tpla_serve.engine.request_table import RequestTable

# A queued request waits for a prefilling one that computes at least this many of its next prompt tokens.
MIN_SHARED_TOKENS = 32


class RequestMemory:
    def __init__(
        self, allocator: PageAllocator, table: RequestTable, page_size: int, cache: RadixCache | None = None
    ) -> None:
        self.allocator = allocator
        self.table = table
        self.page_size = page_size
        self.cache = cache

    def _alloc(self, n: int) -> list[int] | None:
        pages = self.allocator.alloc(n)
        if pages is None and self.cache is not None and self.cache.evict(n - self.allocator.num_free):
            pages = self.allocator.alloc(n)
        return pages

    def match_prefix(self, req: Request) -> None:
        """A request that starts from nothing takes the cached prefix of its tokens (whole pages; at least one
        token left to compute, and none of the positions it wants prompt logprobs for)."""
        if self.cache is None or req.pages or req.num_computed:
            return
        req.cached_tokens = 0
        limit = req.total_len - 1
        if req.wants_prompt_logprobs:  # position s - 1's logits score prompt token s
            limit = min(limit, max(req.logprob_start_len - 1, 0))
        match = self.cache.match(req.tokens_from(0), limit)
        if not match.pages:
            return
        self.cache.lock(match.node)
        req.prefix_node = match.node
        req.pages = list(match.pages)
        req.tree_pages = set(match.pages)
        req.num_computed = req.cached_tokens = match.num_pages * self.page_size

    def prefix_being_computed(self, req: Request, prefilling: list[Request]) -> bool:
        """Whether a request now prefilling computes at least MIN_SHARED_TOKENS of req's prompt just past what
        the cache holds: req then waits, and takes those tokens from the cache a step or two later (as
        SGLang's in-batch prefix check does)."""
        if self.cache is None:
            return False
        start, tokens = req.num_computed, req.prompt_ids
        for other in prefilling:
            theirs = other.prompt_ids
            end = min(len(tokens) - 1, len(theirs), start + MIN_SHARED_TOKENS)
            computing = end - start == MIN_SHARED_TOKENS and other.num_computed < end
            if computing and tokens[start:end] == theirs[start:end]:
                return True
        return False

    def cache_prompt(self, req: Request, num_tokens: int) -> None:
        """The first num_tokens of the request's prompt are computed: their whole pages join the tree (and
        the request locks their node)."""
        if self.cache is None:
            return
        node, adopted = self.cache.insert(req.prompt_ids[:num_tokens], req.pages)
        self.cache.lock(node)
        if req.prefix_node is not None:
            self.cache.unlock(req.prefix_node)
        req.prefix_node = node
        req.tree_pages |= adopted

    def grow(self, req: Request, num_tokens: int) -> bool:
        """Make req's pages cover num_tokens tokens; False (nothing taken) if the pool is short."""
        need = max(0, -(-num_tokens // self.page_size) - len(req.pages))
        if need == 0:
            return True
        pages = self._alloc(need)
        if pages is None:
            return False
        if req.slot is not None:
            self.table.set_pages(req.slot, len(req.pages), pages)
        req.pages.extend(pages)
        return True

    def trim(self, req: Request, num_tokens: int) -> None:
        """Free the request's whole pages past num_tokens (a verified block's rejected positions)."""
        keep = -(-num_tokens // self.page_size)
        if len(req.pages) > keep:
            self.allocator.free(req.pages[keep:])
            del req.pages[keep:]

    def take_slot(self, req: Request) -> bool:
        """A table row for a request that starts running, holding its pages so far and its newest token (a
        retracted request recomputes all but that token, then decodes it); False when none is free."""
        if self.table.num_free == 0:
            return False
        req.slot = self.table.acquire()
        self.table.set_pages(req.slot, 0, req.pages)
        self.table.set_token(req.slot, req.last_token)
        return True

    def reserve(self, req: Request, num_tokens: int) -> bool:
        """Pages for num_tokens and a slot, for a request not yet running; False, nothing taken, if short."""
        if self.table.num_free == 0 or not self.grow(req, num_tokens):
            return False
        return self.take_slot(req)

    def release(self, req: Request) -> None:
        """Give back the request's own pages (not the tree's), its prefix lock and its slot."""
        if req.pages:
            self.allocator.free([p for p in req.pages if p not in req.tree_pages])
            req.pages = []
        if req.prefix_node is not None:
            assert self.cache is not None
            self.cache.unlock(req.prefix_node)
            req.prefix_node = None
        req.tree_pages = set()
        if req.slot is not None:
            self.table.release(req.slot)
            req.slot = None

    def unadmit(self, req: Request) -> None:
        """Release a request that goes back to the queue (deferred, short of pages, or retracted): it
        recomputes from nothing, or from the cached prefix, when it is admitted again."""
        self.release(req)
        req.num_computed = 0
        req.draft_computed = 0
