"""The running requests' state on the device: one row (slot) per request, as SGLang's req_to_token.

A row holds the request's KV page ids, appended as pages are allocated, and the request's newest token,
which the sampler writes on the device: a decode step's inputs are gathers over slot ids, never a walk
over page lists, and its input tokens never visit the host. Rank 0 assigns slots and queues every write
as a TableDelta: the delta travels, as raw int arrays, with the next step rank 0 announces, and every rank
applies it to its own table before that step, so all ranks' tables stay equal.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from tpla_serve.forward_batch import ForwardBatch, ForwardMode, TableDelta

if TYPE_CHECKING:
    from tpla_serve.cache.pool import LatentKVPool
    from tpla_serve.layers.attention.base import AttentionBackend


class DecodeInputs(NamedTuple):
    """The device tensors of a decode step of B requests, one new token each."""

    input_ids: torch.Tensor  # [B] int64
    positions: torch.Tensor  # [B] int64
    out_cache_loc: torch.Tensor  # [B] int64 slot each new token's KV goes to
    seq_lens: torch.Tensor  # [B] int32 KV tokens after the step
    page_table: torch.Tensor  # [B, width] int32


class RequestTable:
    """max_slots rows of max_pages page ids (int32) and one token each, on `device`."""

    def __init__(self, max_slots: int, max_pages: int, device: torch.device) -> None:
        self.max_slots = max_slots
        self.max_pages = max_pages
        self.device = device
        self.pages = torch.zeros(max_slots, max_pages, dtype=torch.int32, device=device)
        self.tokens = torch.zeros(max_slots, dtype=torch.int64, device=device)
        self._free = list(range(max_slots - 1, -1, -1))
        # Queued writes, the last one per entry kept (a slot may be released and taken again between steps).
        self._pages: dict[int, int] = {}  # flat index -> page id
        self._tokens: dict[int, int] = {}  # slot -> token

    # ------------------------------------------------------------ rank 0: slots and queued writes

    @property
    def num_free(self) -> int:
        return len(self._free)

    def acquire(self) -> int:
        """A free slot for a request that starts running (the scheduler admits at most max_slots)."""
        if not self._free:
            raise RuntimeError(f"all {self.max_slots} request slots are in use")
        return self._free.pop()

    def release(self, slot: int) -> None:
        """The request left the running set; its row is overwritten by the next request that takes it."""
        self._free.append(slot)

    def set_pages(self, slot: int, start: int, pages: list[int]) -> None:
        """Row `slot` holds `pages` from column `start` on."""
        if start + len(pages) > self.max_pages:
            raise ValueError(f"{start + len(pages)} pages do not fit a row of {self.max_pages}")
        base = slot * self.max_pages + start
        self._pages.update(zip(range(base, base + len(pages)), pages))

    def set_token(self, slot: int, token: int) -> None:
        """The slot's newest token is known on the host (PD admission, speculative blocks)."""
        self._tokens[slot] = token

    def take_delta(self) -> TableDelta:
        """The writes queued since the last call, for this rank and the others to apply."""
        delta = self.pending_delta()
        self._pages, self._tokens = {}, {}
        return delta

    def pending_delta(self) -> TableDelta:
        """The queued writes, left queued: a rank-0-only reader of the table (the draft of standard
        speculation) applies them early, and the next step still carries them to every rank. Applying a
        delta twice writes the same values."""
        if not (self._pages or self._tokens):
            return TableDelta.empty()
        return TableDelta(
            np.fromiter(self._pages.keys(), dtype=np.int64, count=len(self._pages)),
            np.fromiter(self._pages.values(), dtype=np.int32, count=len(self._pages)),
            np.fromiter(self._tokens.keys(), dtype=np.int64, count=len(self._tokens)),
            np.fromiter(self._tokens.values(), dtype=np.int64, count=len(self._tokens)),
        )

    # ------------------------------------------------------------ every rank

    def apply(self, delta: TableDelta) -> None:
        if delta.page_index.size:
            index = torch.from_numpy(delta.page_index).to(self.device, non_blocking=True)
            pages = torch.from_numpy(delta.page_id).to(self.device, non_blocking=True)
            self.pages.view(-1).index_copy_(0, index, pages)
        if delta.token_slot.size:
            slots = torch.from_numpy(delta.token_slot).to(self.device, non_blocking=True)
            tokens = torch.from_numpy(delta.token_id).to(self.device, non_blocking=True)
            self.tokens.index_copy_(0, slots, tokens)

    def set_tokens(self, slots: torch.Tensor, tokens: torch.Tensor) -> None:
        """The sampler's tokens for `slots`, written on the device (the next decode step's inputs)."""
        self.tokens.index_copy_(0, slots, tokens.to(torch.int64))

    def decode_batch(
        self,
        slots: np.ndarray,
        positions: np.ndarray,
        kv_pool: LatentKVPool,
        attn_backend: AttentionBackend,
        input_ids: torch.Tensor | None = None,
    ) -> ForwardBatch:
        """A decode step of one new token per slot at `positions`, laid out by device gathers; the new
        tokens are the slots' newest tokens unless `input_ids` [B] (drafts, on the device) are given."""
        inputs = self.gather(slots, positions, kv_pool.page_size)
        if input_ids is not None:
            inputs = inputs._replace(input_ids=input_ids)
        seq_lens = (positions + 1).tolist()
        n = len(seq_lens)
        rows = torch.arange(n + 1, dtype=torch.int64, device=self.device)
        kv_indptr = torch.from_numpy(np.concatenate([[0], np.cumsum(positions + 1)])).to(self.device)
        return ForwardBatch(
            mode=ForwardMode.DECODE,
            input_ids=inputs.input_ids,
            positions=inputs.positions,
            q_lens=[1] * n,
            seq_lens=seq_lens,
            qo_indptr=rows,
            kv_indptr=kv_indptr,
            out_cache_loc=inputs.out_cache_loc,
            page_table=inputs.page_table,
            seq_lens_t=inputs.seq_lens,
            logits_indices=rows[:n],
            kv_pool=kv_pool,
            attn_backend=attn_backend,
        )

    def gather(
        self, slots: np.ndarray, positions: np.ndarray, page_size: int, width: int | None = None
    ) -> DecodeInputs:
        """The device inputs of a decode step (page-table columns [0, width): by default those the longest
        request needs)."""
        if width is None:
            width = -(-int(positions.max() + 1) // page_size)
        slots_t = torch.from_numpy(slots).to(self.device, non_blocking=True)
        pos = torch.from_numpy(positions).to(self.device, non_blocking=True)
        table = self.pages.index_select(0, slots_t)[:, :width]
        page = table.gather(1, (pos // page_size).unsqueeze(1)).squeeze(1).to(torch.int64)
        return DecodeInputs(
            input_ids=self.tokens.index_select(0, slots_t),
            positions=pos,
            out_cache_loc=page * page_size + pos % page_size,
            seq_lens=(pos + 1).to(torch.int32),
            page_table=table,
        )
