"""What a request holds of the KV cache: its pages (host allocator) and its row of the request table.

One place keeps the two in step: pages a request takes are written into its table row, and giving a
request's memory back frees both, so the device never reads a page the allocator could hand out again
while the request still runs.
"""

from __future__ import annotations

from tpla_serve.cache.pool import PageAllocator
from tpla_serve.engine.request import Request
from tpla_serve.engine.request_table import RequestTable


class RequestMemory:
    def __init__(self, allocator: PageAllocator, table: RequestTable, page_size: int) -> None:
        self.allocator = allocator
        self.table = table
        self.page_size = page_size

    def grow(self, req: Request, num_tokens: int) -> bool:
        """Make req's pages cover num_tokens tokens; False (nothing taken) if the pool is short."""
        need = max(0, -(-num_tokens // self.page_size) - len(req.pages))
        if need == 0:
            return True
        pages = self.allocator.alloc(need)
        if pages is None:
            return False
        if req.slot is not None:
            self.table.set_pages(req.slot, len(req.pages), pages)
        req.pages.extend(pages)
        return True

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
        """Give back the request's pages and its slot."""
        if req.pages:
            self.allocator.free(req.pages)
            req.pages = []
        if req.slot is not None:
            self.table.release(req.slot)
            req.slot = None
