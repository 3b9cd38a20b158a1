"""Build one TP rank: its model runner, its draft, its PD KV port — the same way on every rank.

Building runs collectives (the KV page count, CUDA graph capture, the KV endpoints), so rank 0 and the
other ranks must build the same parts in the same order: both go through `build_rank`. Rank 0 then adds
what only it runs (the scheduler, the speculative decoder, the PD role); the other ranks serve rank 0's
control operations with `worker_handlers`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from tpla_serve.config import EngineConfig
from tpla_serve.disagg.decode_side import DecodeKVPort, decode_layout, gather_endpoints, rank_handlers
from tpla_serve.disagg.handshake import KVSpec, pool_kv_spec
from tpla_serve.distributed import RandomizeKV, RunDecode, RunDraftBlock, RunDraftStep, RunStep, TPGroup
from tpla_serve.distributed.worker import RankHandlers
from tpla_serve.engine.model_runner import ModelRunner
from tpla_serve.engine.scheduler import PromptKVForward, Scheduler
from tpla_serve.grammar.backend import GrammarBackend
from tpla_serve.net import is_loopback
from tpla_serve.sampling.sampler import Sampler
from tpla_serve.speculative.decoder import SpeculativeDecoder
from tpla_serve.speculative.draft_loop import received_tokens, run_draft_block
from tpla_serve.speculative.draft import (
    DraftModel,
    draft_kv_bytes_per_token,
    draft_model_config,
    holds_draft,
    layer_parallel,
)

logger = logging.getLogger(__name__)


@dataclass
class RankParts:
    """What one TP rank runs. `draft`: the draft model on a rank that speculates (decode) or prefills it
    for its decode servers (PD prefill). `kv_port` / `kv_endpoints`: a PD decode rank's KV receiver and
    every rank's receiving endpoint."""

    config: EngineConfig
    runner: ModelRunner
    tp: TPGroup | None = None
    draft: DraftModel | None = None
    kv_port: DecodeKVPort | None = None
    kv_endpoints: list[str] = field(default_factory=list)
    closed: bool = False

    def kv_spec(self) -> KVSpec:
        """The target's latent KV as a PD peer must see it."""
        runner = self.runner
        return pool_kv_spec(runner.kv_pool, runner.model_config.kv_lora_rank, runner.kv_fingerprint)

    def draft_kv_spec(self) -> KVSpec | None:
        draft = self.draft
        if draft is None:
            return None
        return pool_kv_spec(draft.kv_pool, draft.config.kv_lora_rank, draft.kv_fingerprint)

    def close(self) -> None:
        """Stop receiving KV, drop the CUDA graphs, stop the other ranks (rank 0), free the device memory."""
        if self.closed:
            return
        self.closed = True
        if self.kv_port is not None:
            self.kv_port.close()
            self.kv_port = None
        self.runner.release_graphs()  # graphs hold work of the group's communicator: release them first
        if self.draft is not None:
            self.draft.cuda_graph = None
        if self.tp is not None and self.tp.is_leader:
            self.tp.shutdown()
        self.runner.release_memory()
        self.draft = None


def build_rank(config: EngineConfig, rank: int = 0, tp: TPGroup | None = None) -> RankParts:
    """Load this rank's shards and allocate its pools (every rank of the group calls this together)."""
    draft_config = draft_model_config(config) if holds_draft(config, rank) else None
    extra = draft_kv_bytes_per_token(draft_config, config.torch_dtype) if draft_config is not None else 0
    runner = ModelRunner(config, rank, tp, extra_kv_bytes_per_token=extra)
    parts = RankParts(config, runner, tp)
    try:
        if draft_config is not None:
            parts.draft = DraftModel(config, runner.model_config.vocab_size, runner.num_pages, runner.layout,
                                     runner.device, tp, runner.max_pages_per_request)
            _log_draft(config, parts.draft)
        if config.disaggregation_mode == "decode":
            # Each rank registers the draft KV it keeps: under standard speculation only rank 0 has a draft.
            draft_ranks = tuple(range(config.tp_size)) if layer_parallel(config) else (0,)
            layout = decode_layout(config, parts.kv_spec(), parts.draft_kv_spec(), draft_ranks)
            parts.kv_port = DecodeKVPort(
                layout, rank, runner.kv_pool, kv_host(config, tp), config.disaggregation_timeout,
                config.disaggregation_bootstrap_port,
                draft_pool=parts.draft.kv_pool if parts.draft is not None else None,
                secret=config.disaggregation_secret,
            )
            parts.kv_endpoints = gather_endpoints(parts.kv_port, tp)
    except BaseException:
        if parts.kv_port is not None:
            parts.kv_port.close()
        raise
    return parts


def kv_host(config: EngineConfig, tp: TPGroup | None) -> str:
    """Where a decode rank receives KV: --disaggregation-host, except that a rank of a server spanning nodes
    replaces loopback (the default) with its node's address, which the prefill servers can reach."""
    host = config.disaggregation_host
    if tp is not None and tp.meet.spans_nodes and is_loopback(host):
        return tp.meet.address
    return host


def _log_draft(config: EngineConfig, draft: DraftModel) -> None:
    if config.speculative:
        logger.info(
            "speculative decoding: %s, draft %s (%d layers, groups %s), k = %d",
            config.speculative_algorithm,
            config.speculative_draft_model_path,
            draft.config.num_hidden_layers,
            "sequential" if draft.exact_drafting else draft.groups,
            config.speculative_num_draft_tokens,
        )
    else:
        logger.info(
            "prefilling draft %s (%d layers) for speculative decode servers",
            config.speculative_draft_model_path,
            draft.config.num_hidden_layers,
        )


def launch_rank0(config: EngineConfig) -> RankParts:
    """Rank 0 of an engine: start the other TP ranks (when tp_size > 1) and build with them."""
    if config.node_rank != 0:
        raise ValueError(f"--node-rank {config.node_rank}: rank 0 runs on node 0; the other nodes run their "
                         "ranks only (python -m tpla_serve.launch --role prefill|decode --node-rank N ...)")
    tp = TPGroup.launch(config, worker_handlers) if config.tp_size > 1 else None
    try:
        return build_rank(config, 0, tp)
    except BaseException:
        if tp is not None:  # no rank may stay behind waiting for a collective
            tp.shutdown(kill=True)
        raise


def worker_handlers(config: EngineConfig, tp: TPGroup) -> RankHandlers:
    """Ranks > 0: build this rank's parts and the handler of each of rank 0's operations."""
    parts = build_rank(config, tp.rank, tp)
    runner = parts.runner

    def run_step(op: RunStep) -> None:
        runner.forward_local(op.mode, op.entries, delta=op.delta)
        if op.sample_slots.size:
            runner.receive_tokens(op.sample_slots)

    def run_decode(op: RunDecode) -> None:
        runner.decode_local(op.slots, op.positions, op.delta)
        runner.receive_tokens(op.slots)

    handlers: dict[type, object] = {
        RunStep: run_step,
        RunDecode: run_decode,
        RandomizeKV: lambda op: runner.randomize_kv_local(op.seed),
    }
    if parts.draft is not None:
        draft = parts.draft
        handlers[RunDraftStep] = lambda op: draft.forward_local(op.mode, op.entries)
        handlers[RunDraftBlock] = lambda op: run_draft_block(
            draft, runner.table, op, received_tokens(op, runner.device)
        )
    if parts.kv_port is not None:
        handlers.update(rank_handlers(parts.kv_port, tp))
    return RankHandlers(handlers, close=parts.close)  # type: ignore[arg-type]


def build_scheduler(
    parts: RankParts,
    tokenizer: object | None,
    eos_token_ids: set[int] | None,
    prompt_kv: PromptKVForward | None = None,
) -> Scheduler:
    """Rank 0's scheduler over the rank's runner; with speculative decoding, over verified blocks drafted
    by the rank's draft model. Constrained decoding needs the tokenizer (its vocabulary as text)."""
    spec = None
    vocab = parts.runner.model_config.vocab_size
    if parts.config.speculative:
        assert parts.draft is not None
        spec = SpeculativeDecoder(parts.runner, parts.draft, Sampler(), vocab, set(eos_token_ids or ()))
    grammar = None
    if parts.config.grammar_backend == "xgrammar" and tokenizer is not None:
        grammar = GrammarBackend(tokenizer, vocab, eos_token_ids or ())
    return Scheduler(parts.runner, tokenizer, eos_token_ids, spec=spec, prompt_kv=prompt_kv, grammar=grammar)
