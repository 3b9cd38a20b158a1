"""The scheduler process of a server: owns the engine (and its TP ranks), talks to the HTTP front over ZMQ.

Loop: take every message the front sent, run one scheduler step when there is work, publish the
requests the step changed (every step for streaming requests, the final state for the rest). Role
specifics (PD pairing, KV streaming) live in tpla_serve.disagg (prefill_side.py, decode_side.py) and plug into the
same loop through one protocol (disagg.role.PDRole).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time
import traceback
from collections.abc import Callable
from typing import Any

import zmq

from tpla_serve.config import ServerConfig
from tpla_serve.disagg.decode_side import DecodeRole
from tpla_serve.disagg.prefill_side import PrefillRole, PromptKVStream
from tpla_serve.disagg.role import Bootstrap, PDRole, ServerBusy
from tpla_serve.disagg.sender import KVSender
from tpla_serve.engine.output import request_output
from tpla_serve.engine.request import Request, RequestSpec
from tpla_serve.engine.scheduler import Scheduler
from tpla_serve.engine.tokenizer import eos_token_ids, load_tokenizer
from tpla_serve.entrypoints.rank import RankParts, build_scheduler, launch_rank0
from tpla_serve.sampling.params import SamplingParams
from tpla_serve.server.messages import (
    AbortRequest,
    FlushCache,
    GenerateRequest,
    GetStats,
    Message,
    RequestError,
    RequestOutput,
    Stats,
    decode,
    encode,
)
from tpla_serve.server.scheduler_timing import QueueTimes, Throughput
from tpla_serve.server.watchdog import StepWatchdog

logger = logging.getLogger(__name__)
IDLE_POLL_MS = 1000  # how often an idle scheduler checks that its front is still alive


class TPRankDied(RuntimeError):
    """One of the server's TP ranks is gone: the server cannot compute, and stops (a supervisor restarts it)."""


class SchedulerProcess:
    def __init__(self, config: ServerConfig, to_scheduler: str, from_scheduler: str) -> None:
        self.config = config
        self.ctx = zmq.Context()
        self.inbox = self.ctx.socket(zmq.PULL)
        self.inbox.connect(to_scheduler)
        self.outbox = self.ctx.socket(zmq.PUSH)
        self.outbox.connect(from_scheduler)
        self.from_scheduler = from_scheduler
        self.front_pid = os.getppid()
        self.queue_times = QueueTimes()
        self.throughput = Throughput()
        self.transfers: dict[str, tuple[int, float]] = {}  # rid -> its KV transfer (bytes, seconds), PD decode
        engine = config.engine
        self.parts = launch_rank0(engine)
        self.runner = self.parts.runner
        try:
            self.tokenizer = None if engine.skip_tokenizer_init else load_tokenizer(
                engine.resolved_tokenizer_path, engine.trust_remote_code
            )
            self.scheduler, self.pd = _build_scheduler_and_role(
                config, self.parts, self.tokenizer, eos_token_ids(engine.model_path, self.tokenizer),
                self._record_transfer,
            )
        except BaseException:
            self.parts.close()
            raise
        self.text_in_logprobs: dict[str, bool] = {}
        self.streamed_tokens: dict[str, int] = {}  # output tokens of each streamed request sent so far
        self.watchdog = StepWatchdog(config.watchdog_timeout, self._stuck)
        if self.parts.tp is not None:  # a rank lost while a step waits on it: stop rather than wait
            self.parts.tp.on_lost(self._stuck)

    # ------------------------------------------------------------------ messages

    def send(self, msg: Message) -> None:
        self.outbox.send(encode(msg))

    def model_info(self) -> dict[str, Any]:
        cfg = self.runner.model_config
        return {
            "model_path": self.config.engine.model_path,
            "served_model_name": self.config.model_name,
            "architecture": cfg.architecture,
            "vocab_size": cfg.vocab_size,
            "context_length": self.runner.context_length,
            "is_generation": True,
            "tokenizer_path": self.config.engine.resolved_tokenizer_path,
            "fingerprint": self.runner.model.fingerprint,
        }

    def _record_transfer(self, rid: str, nbytes: int, seconds: float) -> None:
        self.transfers[rid] = (nbytes, seconds)

    def _stuck(self, message: str) -> None:
        """The watchdog's verdict (on its thread): tell the front why, then end this process group."""
        logger.error("%s", message)
        _tell_front(self.from_scheduler, RequestError("", 503, message))  # the outbox is the loop thread's
        if os.getpgrp() == os.getpid():  # a server's scheduler leads its TP ranks' process group
            os.killpg(os.getpgrp(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)

    def stats(self) -> dict[str, Any]:
        data: dict[str, Any] = dataclasses.asdict(self.scheduler.stats())
        data["max_total_tokens"] = self.runner.max_total_tokens
        data["context_length"] = self.runner.context_length
        data["gen_throughput"] = self.throughput.rate(time.monotonic(), self.scheduler.generated_tokens)
        if self.pd is not None:
            data.update(self.pd.stats())
        return data

    def handle(self, msg: Message) -> None:
        """One message from the front. A request the code cannot handle fails alone, with a 500 naming the
        cause; it never stops the server."""
        try:
            self._handle(msg)
        except Exception as e:
            logger.exception("handling %s failed", type(msg).__name__)
            if isinstance(msg, GenerateRequest):
                self.send(RequestError(msg.rid, 500, f"internal error: {type(e).__name__}: {e}"))

    def _handle(self, msg: Message) -> None:
        if isinstance(msg, GenerateRequest):
            self.handle_generate(msg)
        elif isinstance(msg, AbortRequest):
            ended = self.pd.abort(msg.rid, msg.message) if self.pd is not None else []
            req = self.scheduler.abort(msg.rid, msg.message)
            self.publish(ended + ([req] if req is not None else []))
        elif isinstance(msg, FlushCache):
            flushed, message = self.scheduler.flush_cache()
            self.send(Stats({"flushed": flushed, "message": message}))
        elif isinstance(msg, GetStats):
            self.send(Stats(self.stats()))
        else:
            logger.warning("the scheduler got an unexpected %s", type(msg).__name__)

    def handle_generate(self, msg: GenerateRequest) -> None:
        try:
            spec = RequestSpec(
                msg.input_ids, SamplingParams.from_dict(msg.sampling_params), rid=msg.rid,
                return_logprob=msg.return_logprob, logprob_start_len=msg.logprob_start_len,
                top_logprobs_num=msg.top_logprobs_num, stream=msg.stream,
            )
            if self.pd is not None and msg.bootstrap_room is not None:
                bootstrap = Bootstrap(msg.bootstrap_host or "127.0.0.1", msg.bootstrap_port, msg.bootstrap_room)
                ready = self.pd.add(spec, bootstrap)
            else:
                req = self.scheduler.add_request(spec)
                ready = [req] if req.finished else []
        except ValueError as e:
            self.send(RequestError(msg.rid, 400, str(e)))
            return
        except ServerBusy as e:
            self.send(RequestError(msg.rid, 503, str(e)))
            return
        queued = self.scheduler.requests.get(msg.rid)
        if queued is not None:
            self.queue_times.track(queued)
        self.text_in_logprobs[msg.rid] = msg.return_text_in_logprobs
        self.publish(ready)

    def publish(self, reqs: list[Request]) -> None:
        for req in reqs:
            if not (req.finished or req.stream):
                continue
            if not req.finished:
                sent = self.streamed_tokens.get(req.rid, 0)
                if sent and len(req.output_ids) - sent < self.config.stream_interval:
                    continue  # the first token goes at once, then one chunk per --stream-interval tokens
                self.streamed_tokens[req.rid] = len(req.output_ids)
            text = self.text_in_logprobs.get(req.rid, False)
            out = request_output(req, self.tokenizer, text, streaming=not req.finished)
            if not req.finished:
                self.send(RequestOutput(req.rid, out, False, req.first_token_time))
                continue
            self.streamed_tokens.pop(req.rid, None)
            kv_bytes, kv_seconds = self.transfers.pop(req.rid, (0, 0.0))
            self.send(RequestOutput(req.rid, out, True, req.first_token_time, self.queue_times.pop(req.rid),
                                    kv_bytes, kv_seconds))
            self.text_in_logprobs.pop(req.rid, None)
            self.scheduler.pop_finished(req.rid)

    # ------------------------------------------------------------------ loop

    def run(self) -> None:
        self.send(Stats({"ready": True, "model_info": self.model_info(), **self.stats()}))
        poller = zmq.Poller()
        poller.register(self.inbox, zmq.POLLIN)
        if self.pd is not None:  # the KV transport's events wake the loop: no polling while KV is in flight
            poller.register(self.pd.fileno(), zmq.POLLIN)
        while True:
            if self.parts.tp is not None and (why := self.parts.tp.failure()) is not None:
                raise TPRankDied(why)
            busy = self.scheduler.has_work or (self.pd is not None and self.pd.has_work)
            if poller.poll(0 if self.scheduler.has_work else IDLE_POLL_MS):
                while True:
                    try:
                        data = self.inbox.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self.handle(decode(data))
            elif not busy and os.getppid() != self.front_pid:
                logger.info("the HTTP front is gone; the scheduler exits")
                return
            with self.watchdog.step():
                self._run_once()

    def _run_once(self) -> None:
        """What one loop iteration computes: the PD side's events, then one scheduler step."""
        if self.pd is not None:
            self.publish(self.pd.poll())
        if self.scheduler.has_work:
            start = time.monotonic()
            updated = self.scheduler.step()
            self.queue_times.scheduled(start)
            self.throughput.sample(time.monotonic(), self.scheduler.generated_tokens)
            if self.pd is not None:
                self.pd.after_step(updated)
            self.publish(updated)

    def close(self) -> None:
        self.watchdog.stop()
        if self.pd is not None:
            self.pd.close()
        self.parts.close()
        self.inbox.close(0)
        self.outbox.close(linger=2000)  # the last answers, or why the scheduler stopped, still reach the front
        self.ctx.term()


def _build_scheduler_and_role(
    config: ServerConfig, parts: RankParts, tokenizer: object | None, eos: set[int],
    on_transfer: Callable[[str, int, float], None],
) -> tuple[Scheduler, PDRole | None]:
    """The scheduler over rank 0's parts and, for one side of a PD pair, that side's role."""
    engine = config.engine
    if engine.disaggregation_mode == "prefill":
        sender = KVSender(
            parts.kv_spec(),
            draft=parts.draft_kv_spec(),
            host=config.host,
            port=engine.disaggregation_bootstrap_port,
            timeout_s=engine.disaggregation_timeout,
            secret=engine.disaggregation_secret,
        )
        scheduler = build_scheduler(parts, tokenizer, eos, prompt_kv=PromptKVStream(parts.runner, sender, parts.draft))
        return scheduler, PrefillRole(scheduler, sender)
    scheduler = build_scheduler(parts, tokenizer, eos)
    if engine.disaggregation_mode == "decode":
        assert parts.kv_port is not None
        return scheduler, DecodeRole(scheduler, parts.kv_port, parts.kv_endpoints, parts.tp, engine.speculative,
                                     on_transfer=on_transfer)
    return scheduler, None


def _tell_front(from_scheduler: str, error: RequestError) -> None:
    """Deliver one last message on a socket of its own, waiting (up to 2 s) until it has left."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.connect(from_scheduler)
    sock.send(encode(error))
    sock.close(linger=2000)
    ctx.term()


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(0)  # unwinds into close(): TP ranks are told to stop, nothing is orphaned


def run_scheduler_process(config: ServerConfig, to_scheduler: str, from_scheduler: str) -> None:
    """Entry point of the scheduler process (multiprocessing spawn target). SIGTERM stops it cleanly."""
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s scheduler %(levelname)s %(name)s: %(message)s"
    )
    try:
        proc = SchedulerProcess(config, to_scheduler, from_scheduler)
    except BaseException:
        _tell_front(from_scheduler, RequestError("", 500, f"the scheduler failed to start:\n{traceback.format_exc()}"))
        raise
    try:
        proc.run()
    except Exception as e:  # tell the front why, so every waiting request and /health say so
        proc.send(RequestError("", 500, f"the scheduler stopped: {e}"))
        raise
    finally:
        proc.close()
