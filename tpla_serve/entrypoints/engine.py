"""The offline Engine: `sglang.Engine`'s surface over one in-process scheduler.

generate / async_generate (streamed or not, single or batched), get_model_info, get_server_info,
flush_cache, abort, shutdown, with SGLang's keyword arguments (engine_args.py). Outputs and stream chunks
have SGLang's shape; a batch streams chunks of every prompt, each with its `index`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from tpla_serve.config import public_fields
from tpla_serve.engine.model_runner import ModelRunner
from tpla_serve.engine.output import request_output
from tpla_serve.engine.request import Request, RequestSpec
from tpla_serve.engine.tokenizer import eos_token_ids, load_tokenizer
from tpla_serve.entrypoints.checkpoint import check_checkpoint
from tpla_serve.entrypoints.engine_args import apply_log_level, engine_config
from tpla_serve.entrypoints.rank import build_scheduler, launch_rank0
from tpla_serve.entrypoints.streaming import LogprobIncrements
from tpla_serve.sampling.parallel import copy_params, expand, parallel_samples
from tpla_serve.sampling.params import SamplingParams

logger = logging.getLogger(__name__)


def _per_item(value: Any, n: int, name: str) -> list[Any]:
    """Broadcast a scalar request field over a batch, or check a list has one entry per prompt."""
    if isinstance(value, list):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries for {n} prompts")
        return value
    return [value] * n


class Engine:
    """Generate offline: `Engine(model_path=...).generate("def f(x):", {"max_new_tokens": 16})`.

    Keyword arguments are SGLang's (`tp_size`, `log_level`, `trust_remote_code`, ...). Not thread-safe:
    one thread drives it, with generate or with concurrent async_generate calls on one event loop (the
    HTTP server runs its own scheduler loop). After shutdown() every call raises RuntimeError.
    """

    def __init__(self, model_path: str | None = None, **kwargs: Any) -> None:
        if model_path is not None:
            kwargs["model_path"] = model_path
        self.config, log_level = engine_config(kwargs)
        apply_log_level(log_level)
        check_checkpoint(self.config)
        for note in self.config.inapplicable_flags(set(kwargs)):
            logger.warning("%s", note)
        self._shut_down = False
        self.parts = launch_rank0(self.config)
        try:
            self.tokenizer = None if self.config.skip_tokenizer_init else load_tokenizer(
                self.config.resolved_tokenizer_path, self.config.trust_remote_code
            )
            eos = eos_token_ids(self.config.model_path, self.tokenizer)
            self.scheduler = build_scheduler(self.parts, self.tokenizer, eos)
        except BaseException:
            self.parts.close()
            raise

    @property
    def runner(self) -> ModelRunner:
        return self.parts.runner

    # ------------------------------------------------------------------ requests

    def _tokenize(self, prompt: Any) -> list[int]:
        if not isinstance(prompt, str):
            raise ValueError(f"text must be a string or a list of strings, got {type(prompt).__name__}")
        if self.tokenizer is None:
            raise ValueError("text needs a tokenizer; this engine runs on input_ids only (--skip-tokenizer-init)")
        return list(self.tokenizer.encode(prompt))

    def add_requests(
        self,
        prompt: str | list[str] | None = None,
        sampling_params: dict | list[dict] | None = None,
        input_ids: list[int] | list[list[int]] | None = None,
        return_logprob: bool | list[bool] = False,
        logprob_start_len: int | list[int] | None = None,
        top_logprobs_num: int | list[int] | None = None,
        rid: str | list[str] | None = None,
        stream: bool = False,
    ) -> tuple[list[Request], bool]:
        """Validate and queue one request or a batch; all or none (a bad item aborts the ones before it)."""
        self._check_open()
        if (prompt is None) == (input_ids is None):
            raise ValueError("give exactly one of text (prompt) and input_ids")
        if prompt is not None:
            batched = isinstance(prompt, list)
            token_lists = [self._tokenize(p) for p in (prompt if batched else [prompt])]
        else:
            assert input_ids is not None
            batched = bool(input_ids) and isinstance(input_ids[0], list)
            token_lists = input_ids if batched else [input_ids]  # type: ignore[assignment]
            for ids in token_lists:
                if not isinstance(ids, list):
                    raise ValueError("input_ids must be a list of ints or a list of lists of ints")
        n = len(token_lists)
        if n == 0:
            raise ValueError("the batch is empty")
        params = [p.to_dict() if isinstance(p, SamplingParams) else p
                  for p in _per_item(sampling_params, n, "sampling_params")]
        logprob = _per_item(return_logprob, n, "return_logprob")
        start = _per_item(logprob_start_len, n, "logprob_start_len")
        top = _per_item(top_logprobs_num, n, "top_logprobs_num")
        copies = parallel_samples(params)  # n > 1: copy-major samples, answered as a list (SGLang's rule)
        rids = _per_item(rid, n, "rid") if rid is not None else [None] * n
        if copies > 1:
            rids = [None if r is None else f"{r}_{k // n}" for k, r in enumerate(expand(rids, copies))]
        added: list[Request] = []
        try:
            for k in range(n * copies):
                i = k % n
                spec = RequestSpec(
                    token_lists[i],
                    SamplingParams.from_dict(copy_params(params[i], k // n)),
                    rid=rids[k],
                    return_logprob=bool(logprob[i]),
                    logprob_start_len=-1 if start[i] is None else int(start[i]),
                    top_logprobs_num=0 if top[i] is None else int(top[i]),
                    stream=stream,
                )
                added.append(self.scheduler.add_request(spec))
        except ValueError:
            for req in added:
                self.scheduler.abort(req.rid)
                self.scheduler.pop_finished(req.rid)
            raise
        return added, batched or copies > 1

    def generate(
        self,
        prompt: str | list[str] | None = None,
        sampling_params: dict | list[dict] | None = None,
        input_ids: list[int] | list[list[int]] | None = None,
        return_logprob: bool | list[bool] = False,
        logprob_start_len: int | list[int] | None = None,
        top_logprobs_num: int | list[int] | None = None,
        return_text_in_logprobs: bool = False,
        stream: bool = False,
        rid: str | list[str] | None = None,
    ) -> dict | list[dict] | Iterator[dict]:
        """One dict per prompt (a list for a batch), as SGLang's /generate; with stream=True an iterator of
        chunks: cumulative text, output logprobs since the previous chunk, `index` for a batch's prompts."""
        self._check_open()
        reqs, batched = self.add_requests(
            prompt, sampling_params, input_ids, return_logprob, logprob_start_len, top_logprobs_num, rid, stream
        )
        if stream:
            return self._stream(reqs, batched, return_text_in_logprobs)
        try:
            while not all(r.finished for r in reqs):
                self._step()
        except BaseException:
            self._drop(reqs, "the call was interrupted")
            raise
        return self._outputs(reqs, batched, return_text_in_logprobs)

    async def async_generate(
        self,
        prompt: str | list[str] | None = None,
        sampling_params: dict | list[dict] | None = None,
        input_ids: list[int] | list[list[int]] | None = None,
        return_logprob: bool | list[bool] = False,
        logprob_start_len: int | list[int] | None = None,
        top_logprobs_num: int | list[int] | None = None,
        return_text_in_logprobs: bool = False,
        stream: bool = False,
        rid: str | list[str] | None = None,
    ) -> dict | list[dict] | AsyncIterator[dict]:
        """generate() on an event loop: concurrent calls share the scheduler's steps (each step advances
        every running request; a call yields to the loop between steps). With stream=True, an async
        iterator of the same chunks as generate's."""
        self._check_open()
        reqs, batched = self.add_requests(
            prompt, sampling_params, input_ids, return_logprob, logprob_start_len, top_logprobs_num, rid, stream
        )
        if stream:
            return self._astream(reqs, batched, return_text_in_logprobs)
        try:
            while not all(r.finished for r in reqs):
                self._step()
                await asyncio.sleep(0)
        except BaseException:  # cancelled, or the engine failed: nothing may keep running for this call
            self._drop(reqs, "the call was cancelled")
            raise
        return self._outputs(reqs, batched, return_text_in_logprobs)

    def _step(self) -> None:
        self._check_open()
        if self.scheduler.has_work:
            self.scheduler.step()

    def _outputs(self, reqs: list[Request], batched: bool, text_in_logprobs: bool) -> dict | list[dict]:
        outs = [request_output(r, self.tokenizer, text_in_logprobs) for r in reqs]
        for r in reqs:
            self.scheduler.pop_finished(r.rid)
        return outs if batched else outs[0]

    def _drop(self, reqs: list[Request], message: str) -> None:
        """Abort what still runs of a call that ends early and forget all of it."""
        if self._shut_down:
            return
        for r in reqs:
            if not r.finished:
                self.scheduler.abort(r.rid, message)
            self.scheduler.pop_finished(r.rid)

    def _chunks(self, reqs: list[Request], batched: bool, text_in_logprobs: bool, sent: list[int],
                increments: list[LogprobIncrements]) -> list[dict]:
        """A chunk for every request with new tokens or a new end since the last call."""
        chunks = []
        for i, req in enumerate(reqs):
            if sent[i] < 0 or not (req.finished or len(req.output_ids) > sent[i]):
                continue
            sent[i] = -1 if req.finished else len(req.output_ids)
            out = request_output(req, self.tokenizer, text_in_logprobs, streaming=not req.finished)
            chunk = increments[i].chunk(out)
            chunks.append({**chunk, "index": i} if batched else chunk)
        return chunks

    def _stream(self, reqs: list[Request], batched: bool, text_in_logprobs: bool) -> Iterator[dict]:
        sent = [0] * len(reqs)  # tokens sent per request; -1 once its final chunk went out
        increments = [LogprobIncrements() for _ in reqs]
        try:
            while True:
                yield from self._chunks(reqs, batched, text_in_logprobs, sent, increments)
                if all(s < 0 for s in sent):
                    return
                self._step()
        finally:
            self._drop(reqs, "the stream was closed by the client")

    async def _astream(self, reqs: list[Request], batched: bool, text_in_logprobs: bool) -> AsyncIterator[dict]:
        sent = [0] * len(reqs)
        increments = [LogprobIncrements() for _ in reqs]
        try:
            while True:
                for chunk in self._chunks(reqs, batched, text_in_logprobs, sent, increments):
                    yield chunk
                if all(s < 0 for s in sent):
                    return
                self._step()
                await asyncio.sleep(0)
        finally:
            self._drop(reqs, "the stream was closed by the client")

    def abort(self, rid: str) -> bool:
        """Abort a queued or running request; its pages return to the pool."""
        self._check_open()
        return self.scheduler.abort(rid) is not None

    def flush_cache(self) -> dict[str, Any]:
        """Empty the prefix cache (SGLang's Engine.flush_cache); success False, with the reason, while
        requests run or wait."""
        self._check_open()
        success, message = self.scheduler.flush_cache()
        return {"success": success, "message": message}

    def _check_open(self) -> None:
        if self._shut_down:
            raise RuntimeError("the engine is shut down: create a new Engine to generate again")

    def shutdown(self) -> None:
        """Stop the TP ranks and free the engine's memory; the engine answers nothing afterwards."""
        if self._shut_down:
            return
        self._shut_down = True
        self.parts.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def get_model_info(self) -> dict[str, Any]:
        self._check_open()
        config, model = self.config, self.runner.model_config
        return {
            "model_path": config.model_path,
            "tokenizer_path": config.resolved_tokenizer_path,
            "served_model_name": Path(config.model_path).name,
            "is_generation": True,
            "architecture": model.architecture,
            "vocab_size": model.vocab_size,
            "context_length": self.runner.context_length,
            "load_format": config.load_format,
            "disaggregation_mode": config.disaggregation_mode,
        }

    def get_server_info(self) -> dict[str, Any]:
        """The engine's settings (no secrets), its model and the scheduler's state."""
        self._check_open()
        stats = dataclasses.asdict(self.scheduler.stats())
        return {
            **public_fields(self.config),
            "model_architecture": self.runner.model_config.architecture,
            "context_length": self.runner.context_length,
            **stats,
            "model_info": self.get_model_info(),
            "internal_states": [stats],
            "version": _version(),
        }


def _version() -> str:
    try:
        return version("tpla-serve")
    except PackageNotFoundError:
        return "unknown"
