"""The KV stream between processes: a prefill process (prefill_worker.py) and decode ranks in this one,
sharing a cluster secret (the prefill reads it from its environment)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kv_stream_helpers import (
    PAGE_SIZE,
    PagedRank,
    expected_ckv_slice,
    prompt_kv,
    small_spec,
    wait_events,
    wait_until,
)

from tpla_serve.config import DISAGGREGATION_SECRET_ENV
from tpla_serve.disagg import DecodeLayout, KVReceiver, RoomCompleted, RoomFailed

WORKER = Path(__file__).with_name("prefill_worker.py")
SECRET = "the process tests' cluster secret"


class Prefill:
    """A prefill_worker.py process and its JSON-lines pipe."""

    def __init__(self, timeout_s: float = 30.0) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER), str(timeout_s)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1", DISAGGREGATION_SECRET_ENV: SECRET},
        )
        self.port = self.read()["port"]

    def read(self) -> dict:
        line = self.proc.stdout.readline()
        assert line, f"prefill worker exited with {self.proc.poll()}"
        return json.loads(line)

    def send(self, **cmd: object) -> None:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@pytest.fixture(scope="module")
def prefill() -> Iterator[Prefill]:
    p = Prefill()
    yield p
    p.send(cmd="exit")
    p.close()


class DecodeRanks:
    def __init__(self, tp: int, groups: int, **kwargs: object) -> None:
        self.layout = DecodeLayout(kv=small_spec(), tp_size=tp, latent_groups=groups, page_size=PAGE_SIZE)
        self.ranks = [PagedRank(self.layout) for _ in range(tp)]
        self.rx = [KVReceiver(self.layout, r, secret=SECRET, **kwargs) for r in range(tp)]
        self.slots: dict[int, object] = {}

    def expect(self, room: int, n: int, port: int) -> None:
        for rank, rx in zip(self.ranks, self.rx):
            self.slots[room] = slots = rank.reserve(n)
            rx.expect(room, n, rank.writer(slots), "127.0.0.1", port)
        self.rx[0].send_register(room, [rx.endpoint for rx in self.rx])

    def assert_holds(self, room: int, n: int) -> None:
        T, g = self.layout.tp_size, self.layout.latent_groups
        for r, rank in enumerate(self.ranks):
            for layer, (ckv, kpe) in enumerate(prompt_kv(room, n, self.layout.kv)):
                got_ckv, got_kpe = rank.pool.read(layer, self.slots[room])
                assert (got_ckv == expected_ckv_slice(ckv, T, g, r)).all() and (got_kpe == kpe).all(), (
                    r,
                    layer,
                )

    def close(self) -> None:
        for rx in self.rx:
            rx.close()


@pytest.fixture
def decode_ranks() -> Iterator[list[DecodeRanks]]:
    made: list[DecodeRanks] = []
    yield made
    for d in made:
        d.close()


@pytest.mark.parametrize("groups", [2, 1])
@pytest.mark.parametrize("mode", ["wait", "now"], ids=["register-first", "layers-first"])
def test_stream_from_a_prefill_process(prefill: Prefill, decode_ranks: list, groups: int, mode: str) -> None:
    decode = DecodeRanks(2, groups)
    decode_ranks.append(decode)
    room, n = 1000 + groups * 10 + len(mode), 37
    if mode == "now":
        prefill.send(cmd="send", room=room, n=n, mode=mode)
        assert prefill.read() == {"sent": room}
        decode.expect(room, n, prefill.port)
    else:
        decode.expect(room, n, prefill.port)
        prefill.send(cmd="send", room=room, n=n, mode=mode)
        assert prefill.read() == {"registered": True}
        assert prefill.read() == {"sent": room}
    for (event,) in wait_events(decode.rx):
        assert isinstance(event, RoomCompleted) and event.first_token_id == room % 1000, event
    decode.assert_holds(room, n)


def test_layers_stream_while_the_prefill_is_still_computing(prefill: Prefill, decode_ranks: list) -> None:
    decode = DecodeRanks(2, 2)
    decode_ranks.append(decode)
    room, n = 2001, 64
    decode.expect(room, n, prefill.port)
    prefill.send(cmd="send", room=room, n=n, mode="gate")
    assert prefill.read() == {"gated": room}
    # The prefill now holds back layers 1..: layer 0 must reach both ranks anyway.
    assert wait_until(lambda: all(r.calls for r in decode.ranks), 10.0), (
        "layer 0 did not arrive before layer 1"
    )
    assert {layer for r in decode.ranks for layer, *_ in r.calls} == {0}
    assert all(rx.poll() == [] for rx in decode.rx)
    prefill.send(cmd="go")
    assert prefill.read() == {"sent": room}
    for (event,) in wait_events(decode.rx):
        assert isinstance(event, RoomCompleted)
    decode.assert_holds(room, n)


def test_cancel_reaches_the_prefill_process(prefill: Prefill, decode_ranks: list) -> None:
    decode = DecodeRanks(2, 2)
    decode_ranks.append(decode)
    room, n = 3001, 16
    decode.expect(room, n, prefill.port)
    prefill.send(cmd="send", room=room, n=n, mode="stall")
    assert prefill.read() == {"stalled": room}
    assert wait_until(lambda: all(len(r.calls) == 2 for r in decode.ranks), 10.0)
    assert decode.rx[0].cancel(room)
    deadline = time.monotonic() + 10.0
    events: list = []
    while time.monotonic() < deadline and not events:
        prefill.send(cmd="events")
        events = [e for e in prefill.read()["events"] if e[0] == room]
    assert events and "aborted by the client" in events[0][1]
    (rank1,) = wait_events([decode.rx[1]])[0]
    assert isinstance(rank1, RoomFailed) and "aborted by the client" in rank1.message


def test_killed_prefill_fails_the_room_within_the_timeout(decode_ranks: list) -> None:
    timeout_s = 1.0
    decode = DecodeRanks(2, 2, timeout_s=timeout_s)
    decode_ranks.append(decode)
    doomed = Prefill()
    try:
        room, n = 4001, 16
        decode.expect(room, n, doomed.port)
        doomed.send(cmd="send", room=room, n=n, mode="stall")
        assert doomed.read() == {"stalled": room}
        assert wait_until(lambda: all(len(r.calls) == 2 for r in decode.ranks), 10.0)
        doomed.proc.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        events = wait_events(decode.rx, timeout_s=10.0)
        elapsed = time.monotonic() - killed_at
    finally:
        doomed.close()
    for (event,) in events:
        assert (
            isinstance(event, RoomFailed)
            and "timed out" in event.message
            and "2 of 4 layers" in event.message
        )
    assert elapsed < timeout_s + 3.0
    assert all(rx.stats().rooms_live == 0 for rx in decode.rx)
