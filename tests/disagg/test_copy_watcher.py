"""staging.CopyWatcher: the engine's commands reach the IO thread in order, each once its copy to staging
is complete, with every command behind it whose copy is complete too. CUDA events cannot run on this
machine, so `_Copy` stands in for one (query/synchronize of a copy the test completes); the watcher with
real events and real layers is exercised by test_kv_stream_gpu.py on a GPU machine."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from tpla_serve.disagg.staging import CopyWatcher


class _Copy:
    """A device → host copy the test completes by hand."""

    def __init__(self) -> None:
        self._done = threading.Event()
        self.waited_on = threading.Event()

    def complete(self) -> None:
        self._done.set()

    def query(self) -> bool:
        return self._done.is_set()

    def synchronize(self) -> None:
        self.waited_on.set()
        self._done.wait()


@dataclass
class _Cmd:
    name: str
    ready: _Copy | None = None
    dropped: bool = field(default=False)


class _Sink:
    def __init__(self) -> None:
        self.lists: list[list[str]] = []
        self.cond = threading.Condition()

    def forward(self, cmds: list[_Cmd]) -> None:
        with self.cond:
            self.lists.append([c.name for c in cmds])
            self.cond.notify_all()

    def wait_for(self, count: int, timeout_s: float = 5.0) -> list[list[str]]:
        with self.cond:
            assert self.cond.wait_for(lambda: sum(map(len, self.lists)) >= count, timeout_s), self.lists
            return list(self.lists)


def _drop(cmd: _Cmd) -> None:
    cmd.dropped = True


def test_commands_wait_for_their_copy_and_keep_their_order() -> None:
    sink = _Sink()
    watcher = CopyWatcher(sink.forward, _drop)
    copies = [_Copy() for _ in range(3)]
    try:
        for i, copy in enumerate(copies):
            watcher.put(_Cmd(f"layer{i}", copy))
        watcher.put(_Cmd("done"))  # no copy, but behind layers still copying
        time.sleep(0.05)
        assert sink.lists == []  # nothing passes before the first copy completes
        copies[0].complete()
        assert sink.wait_for(1) == [["layer0"]]
        copies[2].complete()  # out of order on purpose: layer2 must still wait behind layer1
        time.sleep(0.05)
        assert sink.lists == [["layer0"]]
        copies[1].complete()
        # layer1 was waited for; layer2 (copied) and DONE (nothing to copy) come along in the same list
        assert sink.wait_for(4) == [["layer0"], ["layer1", "layer2", "done"]]
    finally:
        watcher.close()


def test_commands_without_a_copy_pass_at_once() -> None:
    sink = _Sink()
    watcher = CopyWatcher(sink.forward, _drop)
    try:
        watcher.put(_Cmd("cpu-layer"))
        assert sink.wait_for(1) == [["cpu-layer"]]
    finally:
        watcher.close()


def test_close_lets_the_copy_in_flight_finish_then_refuses_more() -> None:
    sink = _Sink()
    watcher = CopyWatcher(sink.forward, _drop)
    stuck, behind = _Cmd("stuck", _Copy()), _Cmd("behind")
    watcher.put(stuck)
    watcher.put(behind)
    assert stuck.ready is not None and stuck.ready.waited_on.wait(5)
    threading.Timer(0.05, stuck.ready.complete).start()
    watcher.close()  # returns once the copy it waits on is complete: what it waited for is passed on
    assert sink.lists == [["stuck", "behind"]] and not stuck.dropped
    try:
        watcher.put(_Cmd("late"))
    except RuntimeError as exc:
        assert "closed" in str(exc)
    else:
        raise AssertionError("a closed watcher took a command")


def test_a_closed_io_thread_drops_the_rest() -> None:
    def closed(cmds: list[_Cmd]) -> None:
        raise RuntimeError("kv-sender is closed")

    watcher = CopyWatcher(closed, _drop)
    first, second = _Cmd("first"), _Cmd("second", _Copy())
    watcher.put(first)
    deadline = time.monotonic() + 5
    while not first.dropped and time.monotonic() < deadline:
        time.sleep(0.01)
    assert first.dropped
    try:
        watcher.put(second)
    except RuntimeError:
        second.dropped = True  # refused: the caller keeps it
    watcher.close()
    assert second.dropped
