"""The decode side of a PD pair (DESIGN §4): reserve pages, have every rank expect the room, register,
and start decoding when the KV and DONE have arrived.

Every decode rank receives its own slice of the latent straight into its KV pages (DecodeKVPort, pages.py),
and the ranks that keep a draft the draft's whole latent into the draft pool's same pages. Rank 0 (DecodeRole)
owns the rooms: it announces ExpectRoom / AwaitRoom / CancelRoom to the other ranks, whose handlers
(`rank_handlers`) run the same port operations. A room that fails or times out ends its request with an
abort and frees its pages. With speculative decoding the decode asks for the draft's KV too; a prefill that
cannot send it still serves the room, and the draft then prefills the prompt here.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


from tpla_serve.cache.pool import LatentKVPool
from tpla_serve.config import EngineConfig
from tpla_serve.disagg.events import RoomCompleted, RoomFailed
from tpla_serve.disagg.handshake import DecodeLayout, KVSpec
from tpla_serve.disagg.pd_logprobs import check_top_logprobs, first_token_logprobs, prompt_from_wire
from tpla_serve.disagg.pages import KVPages
from tpla_serve.disagg.receiver import KVReceiver
from tpla_serve.disagg.role import KV_TRANSFER_FAILED, Bootstrap, ServerBusy
from tpla_serve.distributed import AwaitRoom, CancelRoom, ExpectRoom, TPGroup
from tpla_serve.engine.request import Request, RequestSpec
from tpla_serve.engine.scheduler import Scheduler

logger = logging.getLogger(__name__)
ENDPOINT_BYTES = 256


def decode_layout(config: EngineConfig, kv: KVSpec, draft: KVSpec | None, draft_ranks: tuple[int, ...]) -> DecodeLayout:
    """What a decode server REGISTERs: the target sharded T ways in g latent groups, and the draft, whole,
    on the ranks that keep one."""
    return DecodeLayout(
        kv,
        config.tp_size,
        config.tpla_groups,
        config.resolved_page_size,
        draft=draft,
        draft_ranks=draft_ranks if draft is not None else (),
    )


class DecodeKVPort:
    """One decode rank's KV receiver and the rooms it has seen finish."""

    def __init__(
        self,
        layout: DecodeLayout,
        rank: int,
        pool: LatentKVPool,
        host: str,
        timeout_s: float,
        default_bootstrap_port: int,
        draft_pool: LatentKVPool | None = None,
        secret: str | None = None,
    ) -> None:
        if layout.wants_draft(rank) != (draft_pool is not None):
            raise ValueError(f"rank {rank}: a draft pool must be given exactly when the layout sends it draft KV")
        self.pool = pool
        self.draft_pool = draft_pool
        self.timeout_s = timeout_s
        self.pages = KVPages(pool, draft_pool)
        self.receiver = KVReceiver(
            layout, rank, host=host, timeout_s=timeout_s, default_bootstrap_port=default_bootstrap_port,
            secret=secret, pin_staging=not self.pages.on_host,
        )
        self.completed: dict[int, RoomCompleted] = {}
        self.failed: dict[int, str] = {}

    @property
    def endpoint(self) -> str:
        return self.receiver.endpoint

    def expect(self, room: int, n_tokens: int, pages: list[int], host: str, port: int | None) -> None:
        self.receiver.expect(room, n_tokens, self.pages.room(pages), host, port)

    def poll(self, timeout_s: float = 0.0) -> list[RoomCompleted | RoomFailed]:
        events = self.receiver.poll(timeout_s)
        for ev in events:
            if isinstance(ev, RoomCompleted):
                self.completed[ev.room] = ev
            else:
                self.failed[ev.room] = ev.message
        return events

    def wait_complete(self, room: int) -> RoomCompleted:
        """Ranks > 0: block until this rank holds the room's KV (rank 0 saw its own slice arrive); the
        wait sleeps on the transport's events, it does not poll."""
        deadline = time.monotonic() + self.timeout_s
        while room not in self.completed:
            if room in self.failed:
                raise RuntimeError(f"room {room}: rank 0 has its KV but this rank failed: {self.failed.pop(room)}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"room {room}: this rank's KV did not arrive within {self.timeout_s} s")
            self.poll(timeout_s=left)
        return self.completed.pop(room)

    def has_draft(self, event: RoomCompleted) -> bool:
        """Whether this rank's draft KV for the room is in place (trivially, when it keeps no draft)."""
        return self.draft_pool is None or event.draft_kv

    def cancel(self, room: int, message: str) -> None:
        self.receiver.cancel(room, message)
        self.forget(room)

    def forget(self, room: int) -> None:
        self.completed.pop(room, None)
        self.failed.pop(room, None)

    def close(self) -> None:
        self.receiver.close()


def gather_endpoints(port: DecodeKVPort, tp: TPGroup | None) -> list[str]:
    """Every rank's receiving endpoint, in rank order (a collective under TP)."""
    if tp is None:
        return [port.endpoint]
    data = port.endpoint.encode()
    if len(data) > ENDPOINT_BYTES:
        raise ValueError(f"endpoint {port.endpoint!r} is longer than {ENDPOINT_BYTES} bytes")
    return [e.decode() for e in tp.all_gather_bytes(data, ENDPOINT_BYTES)]


def rank_handlers(port: DecodeKVPort, tp: TPGroup) -> dict[type, Callable[[Any], None]]:
    """What ranks > 0 do with rank 0's room operations."""

    def expect(op: ExpectRoom) -> None:
        port.expect(op.room, op.n_tokens, op.pages, op.host, op.port)
        tp.barrier()

    def await_room(op: AwaitRoom) -> None:
        tp.all_ranks(port.has_draft(port.wait_complete(op.room)))

    def cancel(op: CancelRoom) -> None:
        port.cancel(op.room, op.message)

    return {ExpectRoom: expect, AwaitRoom: await_room, CancelRoom: cancel}


@dataclass
class _Pending:
    req: Request
    host: str
    port: int | None
    logprob_start_len: int  # as asked for: the prefill computes the prompt's logprobs, DONE brings them
    pages: list[int] | None = None


class DecodeRole:
    """Decode rank 0's rooms: reserve, expect on every rank, register, and start decoding on DONE.

    speculative: the scheduler decodes with a draft, whose KV the prefill may send along.
    """

    def __init__(
        self,
        scheduler: Scheduler,
        port: DecodeKVPort,
        endpoints: list[str],
        tp: TPGroup | None,
        speculative: bool,
        on_transfer: Callable[[str, int, float], None] | None = None,
    ) -> None:
        """on_transfer(rid, bytes, seconds): told of each request's completed KV transfer (metrics)."""
        self.scheduler = scheduler
        self.on_transfer = on_transfer
        self.port = port
        self.endpoints = endpoints
        self.tp = tp
        self.speculative = speculative
        self.pending: OrderedDict[int, _Pending] = OrderedDict()  # room -> request waiting for its KV
        self.rooms: dict[str, int] = {}  # rid -> room
        self.kv_bytes = 0
        self.kv_draft_bytes = 0
        self.kv_seconds = 0.0
        self.no_draft_peers: set[str] = set()  # prefills already logged for sending no draft KV

    @property
    def has_work(self) -> bool:
        return bool(self.pending)

    def add(self, spec: RequestSpec, bootstrap: Bootstrap) -> list[Request]:
        sched = self.scheduler
        room = bootstrap.room
        if len(self.pending) >= self.port.receiver.max_rooms:
            raise ServerBusy(
                f"this decode server already waits for the KV of {len(self.pending)} requests, the most it "
                "holds: retry later or on another decode server"
            )
        if room in self.pending or (spec.rid is not None and (spec.rid in sched.requests or spec.rid in self.rooms)):
            raise ValueError(f"bootstrap_room {room} or rid {spec.rid!r} is already in use")
        # Prompt logprobs are the prefill's: DONE brings them (or, with nothing to decode, the prefill's
        # answer, which the router merges); none are computed here.
        start, spec = spec.logprob_start_len, dataclasses.replace(spec, logprob_start_len=-1)
        if spec.params.max_new_tokens == 0:  # nothing to decode: answer at once, no room needed
            return [sched.add_request(spec)]
        if spec.return_logprob:
            limit = self.port.receiver.max_frame_bytes
            check_top_logprobs(spec.top_logprobs_num, len(spec.input_ids), start, limit)
        req = sched.new_request(spec)
        self.pending[room] = _Pending(req, bootstrap.host, bootstrap.port, start)
        self.rooms[req.rid] = room
        return self._start_waiting()

    def _start_waiting(self) -> list[Request]:
        """Reserve pages and a request slot and register, oldest first; rooms that do not fit wait for
        pages or slots to return. Returns the requests a transport bound ended at once (a 503)."""
        failed: list[Request] = []
        for room, p in list(self.pending.items()):
            if p.pages is not None:
                continue
            n = len(p.req.prompt_ids)
            pages = self.scheduler.reserve(p.req, n)
            if pages is None:
                break
            try:
                self._expect(room, n, pages, p.host, p.port)
            except ValueError as e:  # a bound of the transport: this request ends, the others go on
                del self.pending[room], self.rooms[p.req.rid]
                self.scheduler.unreserve(p.req)
                self.scheduler.add_aborted(p.req, f"cannot receive the KV: {e}", 503, KV_TRANSFER_FAILED)
                failed.append(p.req)
                continue
            p.pages = pages
            self.port.receiver.send_register(room, self.endpoints)
        return failed

    def _expect(self, room: int, n_tokens: int, pages: list[int], host: str, port: int | None) -> None:
        """Every rank starts accepting the room's KV into `pages`; returns once all of them do."""
        self.port.expect(room, n_tokens, pages, host, port)
        if self.tp is not None:
            self.tp.announce(ExpectRoom(room, n_tokens, pages, host, port))
            self.tp.barrier()

    def _await(self, event: RoomCompleted) -> bool:
        """Rank 0 holds the room's KV (`event`); return once every other rank holds its slice too.

        True when every rank that keeps a draft also received the draft's KV for the prompt: only then
        may the request skip prefilling its draft (draft_computed = prompt length).
        """
        has_draft = self.port.has_draft(event)
        if self.tp is None:
            return has_draft
        self.tp.announce(AwaitRoom(event.room))
        return self.tp.all_ranks(has_draft)

    def _cancel(self, room: int, message: str) -> None:
        self.port.cancel(room, message)
        if self.tp is not None:
            self.tp.announce(CancelRoom(room, message))

    def poll(self) -> list[Request]:
        ended: list[Request] = []
        for event in self.port.receiver.poll():
            p = self.pending.pop(event.room, None)
            if p is None:
                continue
            del self.rooms[p.req.rid]
            if isinstance(event, RoomCompleted):
                draft_kv = self._await(event) and self.speculative
                if self.speculative and not draft_kv:
                    self._note_no_draft(p)
                self.kv_bytes += event.nbytes
                self.kv_draft_bytes += event.draft_nbytes
                self.kv_seconds += event.seconds
                if self.on_transfer is not None:
                    self.on_transfer(p.req.rid, event.nbytes, event.seconds)
                assert p.pages is not None
                try:
                    self._record_logprobs(p, event)
                except ValueError as e:  # the prefill's logprobs contradict the request (another version?)
                    self.scheduler.unreserve(p.req)
                    self.scheduler.add_aborted(p.req, f"KV transfer failed: {e}", 503, KV_TRANSFER_FAILED)
                    ended.append(p.req)
                    continue
                self.scheduler.add_prefilled(p.req, p.pages, event.first_token_id, draft_kv=draft_kv)
                if p.req.finished or p.req.stream:
                    ended.append(p.req)
            else:
                ended.append(self._fail(event.room, p, f"KV transfer failed: {event.message}", transfer=True))
        ended.extend(self._start_waiting())
        return ended

    @staticmethod
    def _record_logprobs(p: _Pending, event: RoomCompleted) -> None:
        """The prompt's logprobs and the first token's, as the prefill computed them, when asked for."""
        req = p.req
        if not req.return_logprob:
            return
        if p.logprob_start_len >= 0:
            if event.prompt_logprobs is None:
                raise ValueError("the prefill sent no prompt logprobs, which the request asked for")
            req.input_logprobs = prompt_from_wire(event.prompt_logprobs, req.prompt_ids, p.logprob_start_len)
        req.output_logprobs.extend(
            first_token_logprobs(event.first_token_id, event.first_token_logprob, event.first_token_top)
        )

    def _note_no_draft(self, p: _Pending) -> None:
        peer = f"{p.host}:{p.port if p.port is not None else 'default'}"
        if peer not in self.no_draft_peers:
            self.no_draft_peers.add(peer)
            logger.warning(
                "prefill %s sent no draft-model KV (it has no draft, or another one): the draft prefills "
                "its prompts here",
                peer,
            )

    def _fail(self, room: int, p: _Pending, message: str, transfer: bool = False) -> Request:
        """End a waiting request. transfer: its KV never came (the server's failure, not the client's): the
        answer is a 503 a router retries on another pair."""
        if p.pages is not None:
            self._cancel(room, message)
            self.scheduler.unreserve(p.req)
        if transfer:
            self.scheduler.add_aborted(p.req, message, 503, KV_TRANSFER_FAILED)
        else:
            self.scheduler.add_aborted(p.req, message)
        return p.req

    def abort(self, rid: str, message: str) -> list[Request]:
        room = self.rooms.pop(rid, None)
        if room is None:
            return []
        return [self._fail(room, self.pending.pop(room), message)]

    def fileno(self) -> int:
        """Readable while the KV transport has events for poll()."""
        return self.port.receiver.fileno()

    def stats(self) -> dict[str, Any]:
        s = self.port.receiver.stats()
        return {
            "kv_transfer_bytes": self.kv_bytes,
            "kv_transfer_draft_bytes": self.kv_draft_bytes,
            "kv_transfer_seconds": self.kv_seconds,
            "kv_rooms_waiting": len(self.pending),
            "kv_rooms_prealloc": sum(p.pages is None for p in self.pending.values()),  # waiting for pages
            "kv_rooms_transfer": sum(p.pages is not None for p in self.pending.values()),  # registered
            **{"kv_receiver_" + k: v for k, v in dataclasses.asdict(s).items()},
        }

    def after_step(self, updated: list[Request]) -> None:
        """Nothing to do after a decode step (the prefill role closes rooms here)."""

    def close(self) -> None:
        """The rank's parts own and close the KV port."""
