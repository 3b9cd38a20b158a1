"""The PD roles of a scheduler process: what a prefill or a decode server does with bootstrap rooms.

Prefill: a request with a room runs its prompt as usual; every layer's KV streams to the room as it is
written (tpla_serve.engine.pd_rank), then, when the prefill was given a draft model, the draft's; once the
first token is sampled DONE follows; the request then ends on the prefill (its answer carries the prompt
logprobs the router merges).
Decode: a request with a room reserves pages for its prompt, has every rank expect the room's KV, and
REGISTERs with the prefill; when the KV and DONE arrive, the request joins the running batch with the
prefill's first token. A room that fails or times out ends the request with an abort and frees its pages.
With speculative decoding the decode also asks for the draft's KV; a prefill that cannot send it still
serves the room, and the draft then prefills the prompt on the decode at the first speculative step.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tpla_serve.disagg import KVSender, RoomCompleted
from tpla_serve.engine.request import Request
from tpla_serve.sampling.params import SamplingParams
from tpla_serve.server.messages import GenerateRequest

if TYPE_CHECKING:
    from tpla_serve.server.scheduler_process import SchedulerProcess

logger = logging.getLogger(__name__)


class PrefillRole:
    def __init__(self, sp: SchedulerProcess) -> None:
        self.sp = sp
        runner, engine = sp.runner, sp.config.engine
        self.sender = KVSender(
            runner.kv_spec(),
            draft=runner.draft_kv_spec(),
            host=sp.config.host,
            port=engine.disaggregation_bootstrap_port,
            timeout_s=engine.disaggregation_timeout,
        )
        runner.kv_sender = self.sender
        self.rooms: dict[str, int] = {}  # rid -> room, until DONE is sent
        logger.info("prefill bootstrap listening on %s", self.sender.bootstrap_endpoint)

    has_work = False  # the sender's thread does the waiting

    def add(self, msg: GenerateRequest, params: SamplingParams) -> list[Request]:
        """The prefill samples only the first token; a request for none streams no KV."""
        room = msg.bootstrap_room
        if params.max_new_tokens == 0:
            room = None
        else:
            params = dataclasses.replace(params, max_new_tokens=1, min_new_tokens=min(params.min_new_tokens, 1))
        req = self.sp.scheduler.add_request(
            msg.input_ids, params, rid=msg.rid, return_logprob=msg.return_logprob,
            logprob_start_len=msg.logprob_start_len, top_logprobs_num=msg.top_logprobs_num, stream=msg.stream,
            bootstrap_room=room,
        )
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
                lp = req.output_logprobs[0] if req.output_logprobs else None
                self.sender.send_done(room, req.output_ids[0], lp)
                del self.rooms[req.rid]
            elif req.finished:
                self.sender.abort(room, f"the prefill request ended: {req.finish_reason}")
                del self.rooms[req.rid]

    def poll(self) -> list[Request]:
        """A room that failed while its prompt still runs (decode gone, layout mismatch) ends it."""
        ended = []
        for event in self.sender.poll():
            rid = next((r for r, room in self.rooms.items() if room == event.room), None)
            if rid is None:
                continue
            del self.rooms[rid]
            req = self.sp.scheduler.abort(rid, event.message)
            if req is not None:
                ended.append(req)
        return ended

    def abort(self, rid: str, message: str) -> list[Request]:
        room = self.rooms.pop(rid, None)
        if room is not None:
            self.sender.abort(room, message)
        return []

    def stats(self) -> dict[str, Any]:
        s = self.sender.stats()
        return {
            "kv_transfer_bytes": s.bytes_sent,
            "kv_transfer_draft_bytes": s.draft_bytes_sent,
            "kv_rooms_sent": s.rooms_sent,
            "kv_rooms_failed": s.rooms_failed,
            "kv_rooms_live": s.rooms_live,
            "kv_messages_rejected": s.messages_rejected,
        }

    def close(self) -> None:
        self.sender.close()


@dataclass
class _Pending:
    req: Request
    host: str
    port: int | None
    pages: list[int] | None = None


class DecodeRole:
    """Decode rank 0's rooms: reserve, expect on every rank, register, and start decoding on DONE."""

    def __init__(self, sp: SchedulerProcess) -> None:
        self.sp = sp
        self.runner = sp.runner
        self.port = sp.runner.kv_port
        assert self.port is not None
        self.pending: OrderedDict[int, _Pending] = OrderedDict()  # room -> request waiting for its KV
        self.rooms: dict[str, int] = {}  # rid -> room
        self.kv_bytes = 0
        self.kv_draft_bytes = 0
        self.kv_seconds = 0.0
        self.no_draft_peers: set[str] = set()  # prefills already logged for sending no draft KV

    @property
    def has_work(self) -> bool:
        return bool(self.pending)

    def add(self, msg: GenerateRequest, params: SamplingParams) -> list[Request]:
        sched = self.sp.scheduler
        room = msg.bootstrap_room
        assert room is not None
        if room in self.pending or msg.rid in sched.requests or msg.rid in self.rooms:
            raise ValueError(f"bootstrap_room {room} or rid {msg.rid!r} is already in use")
        # Prompt logprobs come from the prefill's answer (the router merges them): none computed here.
        kw: dict[str, Any] = dict(
            rid=msg.rid, return_logprob=msg.return_logprob, logprob_start_len=-1,
            top_logprobs_num=msg.top_logprobs_num, stream=msg.stream,
        )
        if params.max_new_tokens == 0:  # nothing to decode: answer at once, no room needed
            return [sched.add_request(msg.input_ids, params, **kw)]
        req = sched.new_request(msg.input_ids, params, **kw)
        self.pending[room] = _Pending(req, msg.bootstrap_host or "127.0.0.1", msg.bootstrap_port)
        self.rooms[req.rid] = room
        self._start_waiting()
        return []

    def _start_waiting(self) -> None:
        """Reserve pages and register, oldest first; rooms that do not fit wait for pages to return."""
        allocator, page_size = self.sp.scheduler.allocator, self.runner.page_size
        for room, p in self.pending.items():
            if p.pages is not None:
                continue
            n = len(p.req.prompt_ids)
            pages = allocator.alloc(-(-n // page_size))
            if pages is None:
                return
            p.pages = pages
            self.runner.expect_room(room, n, pages, p.host, p.port)
            self.port.receiver.send_register(room, self.runner.kv_endpoints)

    def poll(self) -> list[Request]:
        sched = self.sp.scheduler
        ended: list[Request] = []
        for event in self.port.receiver.poll():
            p = self.pending.pop(event.room, None)
            if p is None:
                continue
            del self.rooms[p.req.rid]
            if isinstance(event, RoomCompleted):
                draft_kv = self.runner.await_room(event) and self.runner.draft is not None
                if self.runner.draft is not None and not draft_kv:
                    self._note_no_draft(p)
                self.kv_bytes += event.nbytes
                self.kv_draft_bytes += event.draft_nbytes
                self.kv_seconds += event.seconds
                assert p.pages is not None
                sched.add_prefilled(
                    p.req, p.pages, event.first_token_id, event.first_token_logprob, draft_kv=draft_kv
                )
                if p.req.finished or p.req.stream:
                    ended.append(p.req)
            else:
                ended.append(self._fail(event.room, p, event.message))
        self._start_waiting()
        return ended

    def _note_no_draft(self, p: _Pending) -> None:
        peer = f"{p.host}:{p.port if p.port is not None else 'default'}"
        if peer not in self.no_draft_peers:
            self.no_draft_peers.add(peer)
            logger.warning(
                "prefill %s sent no draft-model KV (it has no draft, or another one): the draft prefills "
                "its prompts here",
                peer,
            )

    def _fail(self, room: int, p: _Pending, message: str) -> Request:
        if p.pages is not None:
            self.runner.cancel_room(room, message)
            self.sp.scheduler.allocator.free(p.pages)
        self.sp.scheduler.add_aborted(p.req, message)
        return p.req

    def abort(self, rid: str, message: str) -> list[Request]:
        room = self.rooms.pop(rid, None)
        if room is None:
            return []
        return [self._fail(room, self.pending.pop(room), message)]

    def stats(self) -> dict[str, Any]:
        s = self.port.receiver.stats()
        return {
            "kv_transfer_bytes": self.kv_bytes,
            "kv_transfer_draft_bytes": self.kv_draft_bytes,
            "kv_transfer_seconds": self.kv_seconds,
            "kv_rooms_waiting": len(self.pending),
            **{"kv_receiver_" + k: v for k, v in dataclasses.asdict(s).items()},
        }

    def after_step(self, updated: list[Request]) -> None:
        """Nothing to do after a decode step (the prefill role closes rooms here)."""

    def close(self) -> None:
        """The runner owns and closes the KV port."""


def make_pd_role(sp: SchedulerProcess) -> PrefillRole | DecodeRole:
    return PrefillRole(sp) if sp.config.engine.disaggregation_mode == "prefill" else DecodeRole(sp)
