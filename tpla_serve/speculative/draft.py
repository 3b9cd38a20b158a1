"""The draft model on a decode rank: a small same-family model, replicated (unsharded), with its own KV pool.

The draft pool has as many pages of the same size as the target's, and a request's pages index both: one
page table, one allocator, so rolling back a rejected block frees target and draft KV together.

EasySpec's layer-parallel drafting (DESIGN §5, arXiv 2502.02493): the first and last draft layers run as
usual; the others form consecutive groups of N. In a group, N attention sublayers take the group's input
hidden state at once, one per rank, and write their ("fuzzy") KV into that rank's pool only; one all-reduce
gathers their outputs; then every rank applies the group's residual adds and MLPs in order. Bonus
calibration, an ordinary sequential EXTEND over the verified tokens, then rewrites those tokens' draft KV on
every rank exactly.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import torch

from tpla_serve.cache.pool import LatentKVPool
from tpla_serve.config import EngineConfig
from tpla_serve.distributed import RunDraftStep, TPGroup
from tpla_serve.engine.cuda_graph import CudaGraphRunner
from tpla_serve.engine.request_table import RequestTable
from tpla_serve.forward_batch import BatchEntry, ForwardBatch, ForwardMode, LayerKVSink, build_forward_batch
from tpla_serve.layers.attention import AttentionShape, create_attention_backend
from tpla_serve.layers.linear import tp_all_reduce
from tpla_serve.models.base import DecoderLayer
from tpla_serve.models.config import ModelConfig
from tpla_serve.models.loader import load_model
from tpla_serve.speculative.group_attention import GroupedAttention
from tpla_serve.tpla.layout import ShardLayout


def layer_groups(num_layers: int, group_size: int) -> list[list[int]]:
    """The draft's layers in execution order: [0], then groups of up to N middle layers, then [L-1].

    A group of one layer runs as an ordinary layer; group_size 1 is sequential drafting.
    """
    if num_layers < 1 or group_size < 1:
        raise ValueError(f"need num_layers >= 1 and group_size >= 1, got {num_layers}, {group_size}")
    if num_layers <= 2:
        return [[i] for i in range(num_layers)]
    middle = list(range(1, num_layers - 1))
    return [[0]] + [middle[i : i + group_size] for i in range(0, len(middle), group_size)] + [[num_layers - 1]]


def layer_parallel(config: EngineConfig) -> bool:
    """EasySpec across ranks: every rank holds a draft and computes some of its attention sublayers."""
    return config.speculative_algorithm == "easyspec" and config.tp_size > 1


def holds_draft(config: EngineConfig, rank: int) -> bool:
    """Rank 0 always drafts; the other ranks only take part in layer-parallel (EasySpec) drafting.
    A PD prefill given a draft model prefills it on rank 0, for its decode servers."""
    if config.disaggregation_mode == "prefill":
        return config.speculative_draft_model_path is not None and rank == 0
    return config.speculative and (rank == 0 or layer_parallel(config))


def draft_model_config(config: EngineConfig) -> ModelConfig:
    """The draft's model config, read from --speculative-draft-model-path (a directory or config.json)."""
    assert config.speculative_draft_model_path is not None
    path = Path(config.speculative_draft_model_path)
    return ModelConfig.from_json_file(path) if path.is_file() else ModelConfig.from_pretrained_dir(path)


def draft_kv_bytes_per_token(draft: ModelConfig, dtype: torch.dtype) -> int:
    """KV bytes one token costs in the draft pool (the target's pool sizing leaves room for them)."""
    return LatentKVPool.bytes_per_token(draft.num_hidden_layers, draft.kv_lora_rank, draft.qk_rope_head_dim, dtype)


class DraftModel:
    """One rank's copy of the draft model, its KV pool and its attention backend.

    On rank 0 under layer-parallel drafting, forward() announces every draft step to the other ranks
    (their workers run forward_local() with it): all of them write the draft's KV.
    """

    def __init__(
        self,
        config: EngineConfig,
        target_vocab_size: int,
        num_pages: int,
        tp_layout: ShardLayout,
        device: torch.device,
        tp: TPGroup | None = None,
        max_pages_per_request: int | None = None,
    ) -> None:
        assert config.speculative_draft_model_path is not None
        path = config.speculative_draft_model_path
        dtype = config.torch_dtype
        page_size = config.resolved_page_size
        self.model = load_model(
            path, dtype=dtype, device=device, load_format=config.load_format, seed=config.random_seed,
            show_progress=False,
        )
        self.config = self.model.config
        if self.config.vocab_size != target_vocab_size:
            raise ValueError(
                f"the draft model {path} has vocab_size {self.config.vocab_size}, the target "
                f"{target_vocab_size}: a draft must share the target's tokenizer"
            )
        self.device = device
        self.tp = tp
        self.tp_layout = tp_layout  # the target's: the group all-reduce runs over the decode server's ranks
        self.layer_parallel = layer_parallel(config)
        shape = AttentionShape(
            self.config.num_attention_heads,
            self.config.kv_lora_rank,
            self.config.qk_rope_head_dim,
            page_size,
            dtype,
            self.model.layers[0].self_attn.scale,
        )
        # FlashInfer serves only some latent widths: a draft it cannot serve takes the automatic choice instead.
        name = "auto" if config.attention_backend == "flashinfer" else config.attention_backend
        self.attn_backend = create_attention_backend(name, device, shape)
        self.groups = layer_groups(self.config.num_hidden_layers, config.resolved_easyspec_group_size)
        self.kv_pool = LatentKVPool(
            self.config.num_hidden_layers,
            num_pages,
            page_size,
            self.config.kv_lora_rank,
            self.config.qk_rope_head_dim,
            dtype,
            device,
        )
        # EasySpec on one device: each group's attention sublayers batched (a backend of their own, as
        # their batch is planned apart from the step's).
        self.batched: dict[int, GroupedAttention] = {}
        if config.speculative_algorithm == "easyspec" and not self.layer_parallel:
            group_backend = "triton" if device.type == "cuda" else "torch"
            self.group_backend = create_attention_backend(group_backend, device)
            for group in self.groups:
                if len(group) > 1:
                    layers = [self.model.layers[i] for i in group]
                    attn = GroupedAttention(layers, group[0], self.kv_pool)  # type: ignore[arg-type]
                    self.batched[group[0]] = attn
        self.kv_fingerprint = hashlib.sha256(f"{self.model.fingerprint}|draft".encode()).hexdigest()[:16]
        self.cuda_graph: CudaGraphRunner | None = None
        graphs = config.speculative and device.type == "cuda" and not config.disable_cuda_graph
        if graphs and max_pages_per_request:
            self.cuda_graph = self._capture_graphs(config, max_pages_per_request)

    def _capture_graphs(self, config: EngineConfig, max_pages: int) -> CudaGraphRunner:
        """Draft decode steps (q_len 1, in layer groups) and calibrations of k + 1 tokens (exact), per batch
        bucket; under layer-parallel drafting every rank captures them together (the all-reduces pair up)."""
        k = config.speculative_num_draft_tokens
        graphs = CudaGraphRunner(
            self.model, self.attn_backend, self.kv_pool, config, self.device, max_pages,
            q_lens=(1, k + 1), forward=lambda fb: self._run(fb, grouped=fb.q_lens[0] == 1, logits=True),
        )
        if self.tp is not None and self.layer_parallel:
            self.tp.collective(graphs.capture)
        else:
            graphs.capture()
        return graphs

    @property
    def calibration_tokens(self) -> int | None:
        """Tokens a calibration must span to replay from a CUDA graph (k + 1), or None without graphs."""
        graphs = self.cuda_graph
        return graphs.q_lens[-1] if graphs is not None and graphs.graphs and len(graphs.q_lens) > 1 else None

    @property
    def exact_drafting(self) -> bool:
        """Whether draft decode steps are the exact sequential forward (no layer groups), so the KV they
        write for drafts that are then accepted needs no calibration."""
        return all(len(group) == 1 for group in self.groups)

    def forward(self, mode: ForwardMode, entries: list[BatchEntry]) -> torch.Tensor:
        """Rank 0: fp32 logits of the rows the entries ask for. EXTEND is the exact sequential forward
        (draft prefill); DECODE drafts one token per request, in layer groups under EasySpec (across ranks
        when layer-parallel)."""
        if self.tp is None or not self.layer_parallel:
            logits = self.forward_local(mode, entries)
        else:
            self.tp.announce(RunDraftStep(mode, entries))
            logits = self.tp.collective(lambda: self.forward_local(mode, entries))
        assert logits is not None
        return logits

    @torch.inference_mode()
    def forward_local(
        self,
        mode: ForwardMode,
        entries: list[BatchEntry],
        kv_sink: LayerKVSink | None = None,
        exact: bool = False,
        all_ranks: bool = False,
    ) -> torch.Tensor | None:
        """This rank's part of a draft step; logits on rank 0 only, or on every rank with `all_ranks`
        (kv_sink: a PD prefill streams the KV). DECODE steps run in EasySpec's layer groups unless `exact`
        (bonus calibration)."""
        graphs = self.cuda_graph
        if kv_sink is None and exact and graphs is not None and graphs.can_run(mode, entries):
            if len(entries[0].new_token_ids) > 1:  # the captured q_len > 1 steps are the exact forward
                return graphs.replay(entries)
        fb = build_forward_batch(mode, entries, self.kv_pool, self.attn_backend, self.device)
        fb.kv_sink = kv_sink
        self.attn_backend.prepare(fb)
        grouped = mode is ForwardMode.DECODE and not exact and all(q == 1 for q in fb.q_lens)
        return self._run(fb, grouped, logits=kv_sink is None and (all_ranks or self.tp_layout.tp_rank == 0))

    @torch.inference_mode()
    def decode_from_table(
        self,
        table: RequestTable,
        slots: np.ndarray,
        positions: np.ndarray,
        input_ids: torch.Tensor,
        all_ranks: bool = False,
    ) -> torch.Tensor | None:
        """One draft decode step of the requests in `slots`, feeding input_ids [B] (on the device) at
        `positions`, pages gathered from the request table; in layer groups under EasySpec."""
        graphs = self.cuda_graph
        if graphs is not None and graphs.can_replay(len(slots), int(positions.max()) + 1):
            return graphs.replay_from_table(table, slots, positions, input_ids)
        fb = table.decode_batch(slots, positions, self.kv_pool, self.attn_backend, input_ids)
        self.attn_backend.prepare(fb)
        return self._run(fb, grouped=True, logits=all_ranks or self.tp_layout.tp_rank == 0)

    def _run(self, fb: ForwardBatch, grouped: bool, logits: bool) -> torch.Tensor | None:
        """Logits of fb's logits rows when asked for (rank 0; every rank inside a CUDA graph)."""
        model = self.model
        x, cos, sin = model.embed(fb)
        group_batches: dict[int, ForwardBatch] = {}
        for group in self.groups if grouped else [[i] for i in range(len(model.layers))]:
            if len(group) == 1:
                x = model.layers[group[0]](x, cos, sin, fb)
            elif self.layer_parallel:
                x = self._parallel_group([model.layers[i] for i in group], x, cos, sin, fb)
            else:
                attn = self.batched[group[0]]
                if attn.n not in group_batches:  # one batch (and backend plan) per group size and step
                    group_batches[attn.n] = gfb = attn.batch(fb, self.group_backend)
                    self.group_backend.prepare(gfb)
                gfb = dataclasses.replace(group_batches[attn.n], kv_pool=attn.pool)
                x = self._apply_group([model.layers[i] for i in group], x, attn(x, cos, sin, gfb))
        return model.logits(x, fb) if logits else None

    def _parallel_group(
        self, layers: list[DecoderLayer], x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, fb: ForwardBatch
    ) -> torch.Tensor:
        """Rank r computes the attention of the group's r-th layer on the group's input; all ranks then
        apply x += A_i; x += MLP_i(x) in layer order."""
        rank = self.tp_layout.tp_rank
        attn = x.new_zeros(len(layers), *x.shape)
        if rank < len(layers):
            attn[rank] = layers[rank].attention(x, cos, sin, fb)
        return self._apply_group(layers, x, tp_all_reduce(attn, self.tp_layout))

    @staticmethod
    def _apply_group(layers: list[DecoderLayer], x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """x += A_i; x += MLP_i(x), in layer order, from the group's attention contributions A [N, T, H]."""
        for i, layer in enumerate(layers):
            x = x + attn[i]
            x = x + layer.feed_forward(x)
        return x
