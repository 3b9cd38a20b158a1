"""How a registered prefill room's layers and DONE go out: sliced per decode rank along its routes
(routes.py), each message handed to the data plane on its layer's lane with what it must give back
when done (staging buffers) and who hears when it could not be sent."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from tpla_serve.disagg.handshake import KVSpec
from tpla_serve.disagg.messages import Done, encode
from tpla_serve.disagg.routes import draft_layer_messages, target_layer_messages
from tpla_serve.disagg.sender_rooms import LayerCmd, SenderRoom
from tpla_serve.disagg.staging import Holds, StagingPool
from tpla_serve.disagg.transport import DataSender, SendDone


class RoomStreamer:
    """Streams registered rooms (the sender's IO thread). Each method returns why the room must fail,
    or None; a send the plane refuses at once raises (SEND_ERRORS), one that fails later reaches
    on_failed(room, why) on the plane's thread."""

    def __init__(
        self, kv: KVSpec, data: DataSender, staging: StagingPool, on_failed: Callable[[int, str], None]
    ) -> None:
        self.kv = kv
        self.data = data
        self.staging = staging
        self.on_failed = on_failed
        self.bytes_sent = 0  # draft included
        self.draft_bytes_sent = 0

    def layer(self, state: SenderRoom, cmd: LayerCmd) -> str | None:
        reg, routes = state.registration, state.routes
        assert reg is not None and routes is not None
        draft = cmd.layer >= self.kv.num_layers
        if draft and not routes.send_draft:
            return None  # the decode does not want this draft's KV
        problem = state.take_layer(cmd, reg.n_tokens)
        if problem is not None:
            return problem
        messages = draft_layer_messages if draft else target_layer_messages
        lane = cmd.layer % routes.lanes
        for endpoint, frames, nbytes, holds, fill in messages(routes, state.room, cmd, self.staging):
            self.data.send(endpoint, lane, state.room, frames, self._sent(state.room, holds), fill)
            self.bytes_sent += nbytes
            if draft:
                self.draft_bytes_sent += nbytes
        return None

    def done(self, state: SenderRoom, done: Done) -> str | None:
        """DONE to every rank, behind the last layer on its lane (one write when that one still waits)."""
        reg, routes = state.registration, state.routes
        assert reg is not None and routes is not None
        send_draft = routes.send_draft
        wire_layers = len(state.next_start) if send_draft else self.kv.num_layers
        problem = state.unfinished_layer(wire_layers, reg.n_tokens)
        if problem is not None:
            return problem
        lane = (wire_layers - 1) % routes.lanes
        for rank, endpoint in enumerate(reg.rank_endpoints):
            msg = dataclasses.replace(
                done,
                prompt_logprobs=done.prompt_logprobs if rank == 0 else None,
                first_token_top=done.first_token_top if rank == 0 else None,
                draft_kv=send_draft and reg.layout.wants_draft(rank),
            )
            self.data.send(endpoint, lane, state.room, encode(msg, routes.key), self._sent(state.room))
        return None

    def _sent(self, room: int, holds: tuple[Holds, ...] = ()) -> SendDone:
        """A message's on_done: give back its staging buffers; a failed send fails the room."""

        def on_done(error: str | None) -> None:
            for h in holds:
                h.drop()
            if error is not None:
                self.on_failed(room, error)

        return on_done
