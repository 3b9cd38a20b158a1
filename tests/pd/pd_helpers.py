"""Scheduler processes driven through their ZMQ message protocol, as each server's front does."""

from __future__ import annotations

import multiprocessing as mp
import tempfile

import zmq

from tpla_serve.config import EngineConfig, ServerConfig
from tpla_serve.server.messages import GetStats, RequestOutput, Stats, decode, encode
from tpla_serve.server.scheduler_process import run_scheduler_process


class Sched:
    """A scheduler process and the two sockets a front would hold."""

    def __init__(self, engine: EngineConfig, wait: bool = True) -> None:
        d = tempfile.mkdtemp()
        to_s, from_s = f"ipc://{d}/to", f"ipc://{d}/from"
        self.ctx = zmq.Context()
        self.push = self.ctx.socket(zmq.PUSH)
        self.push.bind(to_s)
        self.pull = self.ctx.socket(zmq.PULL)
        self.pull.bind(from_s)
        self.proc = mp.get_context("spawn").Process(
            target=run_scheduler_process, args=(ServerConfig(engine), to_s, from_s)
        )
        self.proc.start()
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        ready = self.recv(180)
        assert isinstance(ready, Stats) and ready.data["ready"], ready

    def send(self, msg) -> None:
        self.push.send(encode(msg))

    def recv(self, timeout_s: float = 60):
        assert self.pull.poll(int(timeout_s * 1000)), "no answer from the scheduler"
        return decode(self.pull.recv())

    def final(self, timeout_s: float = 60) -> RequestOutput:
        while True:
            msg = self.recv(timeout_s)
            if isinstance(msg, RequestOutput) and msg.finished:
                return msg

    def stats(self) -> dict:
        self.send(GetStats())
        while not isinstance(msg := self.recv(), Stats):
            pass
        return msg.data

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.join(30)
        assert self.proc.exitcode is not None
        self.ctx.destroy(0)
