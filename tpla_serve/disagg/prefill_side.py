"""The prefill side of a PD pair (DESIGN §4): stream each prompt's KV to its room as it is computed.

A request with a bootstrap room runs its prompt as usual; every layer's new KV rows go to the room right
after the layer writes them (LayerKVStreamer), so bytes move while the next layers compute; when the
prefill was given a draft model, the draft's layers follow. Once the first token is sampled, DONE closes
the room with the logprobs the decode's answer reports (pd_logprobs.py), and the request ends here.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np
import torch

from tpla_serve.cache.pool import LatentKVPool
from tpla_serve.disagg.pd_logprobs import check_top_logprobs, prompt_to_wire, top_to_wire
from tpla_serve.disagg.role import Bootstrap
from tpla_serve.disagg.sender import KVSender
from tpla_serve.engine.model_runner import NO_SLOTS, ModelRunner
from tpla_serve.engine.request import Request, RequestSpec
from tpla_serve.engine.scheduler import Scheduler
from tpla_serve.forward_batch import BatchEntry, ForwardMode
from tpla_serve.sampling.logprobs import TokenLogprobs
from tpla_serve.speculative.draft import DraftModel

logger = logging.getLogger(__name__)


class LayerKVStreamer:
    """A LayerKVSink that sends each room's rows of every layer as it is written (draft: the layers are
    the draft model's, in `pool`). A room whose prompt starts with a cached prefix gets that prefix's rows,
    read from the pool, before the layer's new rows (each layer's tokens go out in order)."""

    def __init__(
        self, sender: KVSender, entries: list[BatchEntry], pool: LatentKVPool, draft: bool = False
    ) -> None:
        self.sender = sender
        self.pool = pool
        self.draft = draft
        self.rows: list[tuple[int, int, int, int]] = []  # (room, first row, end row, token_start)
        self.cached: list[tuple[int, torch.Tensor, int]] = []  # (room, prefix slots, token_start)
        page = pool.page_size
        row = 0
        for e in entries:
            if e.kv_room is not None:
                self.rows.append((e.kv_room, row, row + len(e.new_token_ids), e.prefix_len))
                if e.kv_start is not None and e.kv_start < e.prefix_len:
                    slots = [e.pages[t // page] * page + t % page for t in range(e.kv_start, e.prefix_len)]
                    slots_t = torch.tensor(slots, dtype=torch.int64, device=pool.ckv[0].device)
                    self.cached.append((e.kv_room, slots_t, e.kv_start))
            row += len(e.new_token_ids)

    def on_layer(self, layer: int, ckv: torch.Tensor, kpe: torch.Tensor) -> None:
        for room, slots, start in self.cached:
            prefix_ckv, prefix_kpe = self.pool.read(layer, slots)
            self.sender.send_layer(room, layer, prefix_ckv, prefix_kpe, start, draft=self.draft)
        for room, r0, r1, start in self.rows:
            self.sender.send_layer(
                room, layer, ckv[r0:r1].contiguous(), kpe[r0:r1].contiguous(), start, draft=self.draft
            )


class PromptKVStream:
    """The scheduler's PromptKVForward on a prefill server: runs prompt chunks, streaming the KV of those
    with a room; with a draft model, then the draft's exact forward over every chunk, streamed for those
    with a room (a decode's draft starts at the prompt's end; a cached prefix needs the draft's KV too)."""

    def __init__(self, runner: ModelRunner, sender: KVSender, draft: DraftModel | None) -> None:
        self.runner = runner
        self.sender = sender
        self.draft = draft

    def forward(self, entries: list[BatchEntry], sample_slots: np.ndarray = NO_SLOTS) -> torch.Tensor:
        rooms = [e for e in entries if e.kv_room is not None]
        sink = LayerKVStreamer(self.sender, entries, self.runner.kv_pool) if rooms else None
        logits = self.runner.forward(ForwardMode.EXTEND, entries, kv_sink=sink, sample_slots=sample_slots)
        if self.draft is not None:  # every chunk: a cached prefix must hold the draft's KV as well
            chunks = [dataclasses.replace(e, logits_for_all=False) for e in entries]
            sink = LayerKVStreamer(self.sender, chunks, self.draft.kv_pool, draft=True) if rooms else None
            self.draft.forward_local(ForwardMode.EXTEND, chunks, kv_sink=sink)
        return logits


class PrefillRole:
    """A prefill server's rooms: which request streams to which room, until DONE or failure."""

    def __init__(self, scheduler: Scheduler, sender: KVSender) -> None:
        self.scheduler = scheduler
        self.sender = sender
        self.rooms: dict[str, int] = {}  # rid -> room, until DONE is sent
        logger.info("prefill bootstrap listening on %s", self.sender.bootstrap_endpoint)

    has_work = False  # the sender's thread does the waiting

    def add(self, spec: RequestSpec, bootstrap: Bootstrap) -> list[Request]:
        """The prefill samples only the first token; a request for none streams no KV."""
        room: int | None = bootstrap.room
        params = spec.params
        if params.max_new_tokens == 0:
            room = None
        else:
            if spec.return_logprob:  # DONE carries them
                check_top_logprobs(spec.top_logprobs_num, len(spec.input_ids), spec.logprob_start_len)
            params = dataclasses.replace(params, max_new_tokens=1, min_new_tokens=min(params.min_new_tokens, 1))
        req = self.scheduler.add_request(dataclasses.replace(spec, params=params), bootstrap_room=room)
        if room is not None:
            self.rooms[req.rid] = room
        return [req] if req.finished else []

    def after_step(self, updated: list[Request]) -> None:
        """The first token closes the room: every layer went out before it (the sender keeps order)."""
        for req in updated:
            room = self.rooms.get(req.rid)
            if room is None:
                continue
            if req.output_ids:
                self._send_done(room, req)
                del self.rooms[req.rid]
            elif req.finished:
                self.sender.abort(room, f"the prefill request ended: {req.finish_reason}")
                del self.rooms[req.rid]

    def _send_done(self, room: int, req: Request) -> None:
        """DONE with the first token and, when asked for, its logprobs and the prompt's; those now travel
        with the decode's answer, so this request's own answer reports none of the prompt's."""
        if not req.return_logprob:
            self.sender.send_done(room, req.output_ids[0])
            return
        out = req.output_logprobs
        prompt = None
        if req.logprob_start_len >= 0:
            prompt = prompt_to_wire(req.input_logprobs, req.logprob_start_len)
            req.input_logprobs = TokenLogprobs()
        self.sender.send_done(room, req.output_ids[0], out.values[0], prompt, top_to_wire(out, 0))

    def poll(self) -> list[Request]:
        """A room that failed while its prompt still runs (decode gone, layout mismatch) ends it."""
        ended = []
        for event in self.sender.poll():
            rid = next((r for r, room in self.rooms.items() if room == event.room), None)
            if rid is None:
                continue
            del self.rooms[rid]
            req = self.scheduler.abort(rid, event.message)
            if req is not None:
                ended.append(req)
        return ended

    def abort(self, rid: str, message: str) -> list[Request]:
        room = self.rooms.pop(rid, None)
        if room is not None:
            self.sender.abort(room, message)
        return []

    def fileno(self) -> int:
        """Readable while the KV transport has events for poll()."""
        return self.sender.fileno()

    def stats(self) -> dict[str, Any]:
        s = self.sender.stats()
        return {
            "kv_transfer_bytes": s.bytes_sent,
            "kv_transfer_draft_bytes": s.draft_bytes_sent,
            "kv_rooms_sent": s.rooms_sent,
            "kv_rooms_failed": s.rooms_failed,
            "kv_rooms_live": s.rooms_live,
            "kv_rooms_registered": s.rooms_registered,
            "kv_messages_rejected": s.messages_rejected,
            "kv_messages_unauthenticated": s.messages_unauthenticated,
        }

    def close(self) -> None:
        self.sender.close()
