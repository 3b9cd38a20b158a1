"""The offline Engine: SGLang's `Engine.generate` surface over one in-process scheduler."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from typing import Any

from tpla_serve.config import EngineConfig, public_fields
from tpla_serve.engine.model_runner import ModelRunner
from tpla_serve.engine.output import request_output
from tpla_serve.engine.request import Request, RequestSpec
from tpla_serve.engine.tokenizer import eos_token_ids, load_tokenizer
from tpla_serve.entrypoints.rank import build_scheduler, launch_rank0
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

    Not thread-safe: one caller drives it (the HTTP server runs its own scheduler loop).
    """

    def __init__(self, model_path: str | None = None, **kwargs: Any) -> None:
        if model_path is not None:
            kwargs["model_path"] = model_path
        self.config = EngineConfig(**kwargs)
        self.parts = launch_rank0(self.config)
        try:
            self.tokenizer = None if self.config.skip_tokenizer_init else load_tokenizer(
                self.config.resolved_tokenizer_path
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
        params = _per_item(sampling_params, n, "sampling_params")
        logprob = _per_item(return_logprob, n, "return_logprob")
        start = _per_item(logprob_start_len, n, "logprob_start_len")
        top = _per_item(top_logprobs_num, n, "top_logprobs_num")
        rids = _per_item(rid, n, "rid") if rid is not None else [None] * n
        added: list[Request] = []
        try:
            for i in range(n):
                sp = params[i] if isinstance(params[i], SamplingParams) else SamplingParams.from_dict(params[i])
                spec = RequestSpec(
                    token_lists[i],
                    sp,
                    rid=rids[i],
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
        return added, batched

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
        """One dict per prompt (a list for a batch), as SGLang's /generate; with stream=True an iterator
        of cumulative dicts for a single prompt."""
        reqs, batched = self.add_requests(
            prompt, sampling_params, input_ids, return_logprob, logprob_start_len, top_logprobs_num, rid, stream
        )
        if stream:
            if batched:
                for req in reqs:
                    self.abort(req.rid)
                    self.scheduler.pop_finished(req.rid)
                raise ValueError("stream=True takes a single prompt")
            return self._stream(reqs[0], return_text_in_logprobs)
        while not all(r.finished for r in reqs):
            self.scheduler.step()
        outs = [request_output(r, self.tokenizer, return_text_in_logprobs) for r in reqs]
        for r in reqs:
            self.scheduler.pop_finished(r.rid)
        return outs if batched else outs[0]

    def _stream(self, req: Request, return_text_in_logprobs: bool) -> Iterator[dict]:
        sent_tokens = 0
        try:
            while True:
                if not req.finished:
                    self.scheduler.step()
                if req.finished or len(req.output_ids) > sent_tokens:
                    sent_tokens = len(req.output_ids)
                    yield request_output(req, self.tokenizer, return_text_in_logprobs, streaming=True)
                if req.finished:
                    return
        finally:
            if not req.finished:
                self.scheduler.abort(req.rid, "the stream was closed by the client")
            self.scheduler.pop_finished(req.rid)

    def abort(self, rid: str) -> bool:
        """Abort a queued or running request; its pages return to the pool."""
        return self.scheduler.abort(rid) is not None

    def flush_cache(self) -> bool:
        """Empty the prefix cache (as SGLang's Engine.flush_cache); False while requests run or wait."""
        return self.scheduler.flush_cache()[0]

    def shutdown(self) -> None:
        """Stop the TP ranks and free the engine's memory."""
        self.parts.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def get_server_info(self) -> dict[str, Any]:
        stats = self.scheduler.stats()
        return {
            **public_fields(self.config),
            "model_architecture": self.runner.model_config.architecture,
            "context_length": self.runner.context_length,
            **dataclasses.asdict(stats),
        }
