"""Owns the model, the latent KV pool, its page allocator and the attention backend; runs one step.

With tp_size > 1, rank 0's runner also starts the other ranks and announces every step to them; their
runners replay the steps in serve_forever().
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist

from tpla_serve.cache.pool import LatentKVPool, PageAllocator
from tpla_serve.config import EngineConfig
from tpla_serve.disagg import DecodeLayout, KVSender, KVSpec, RoomCompleted
from tpla_serve.engine.cuda_graph import CudaGraphRunner
from tpla_serve.forward_batch import BatchEntry, ForwardMode, build_forward_batch
from tpla_serve.engine.pd_rank import DecodeKVPort, LayerKVStreamer, gather_endpoints, kv_spec
from tpla_serve.engine.tp import ControlChannel, TPRanks, init_tp, rank_device
from tpla_serve.layers.attention import AttentionShape, create_attention_backend
from tpla_serve.models.config import ModelConfig
from tpla_serve.models.loader import load_model
from tpla_serve.speculative.draft import DraftModel
from tpla_serve.tpla.layout import ShardLayout
from tpla_serve.tpla.options import TPLAOptions

logger = logging.getLogger(__name__)
T = TypeVar("T")


class ModelRunner:
    def __init__(self, config: EngineConfig, rank: int = 0, control: ControlChannel | None = None) -> None:
        self.config = config
        self.rank = rank
        self.layout = ShardLayout(config.tp_size, rank, config.tpla_groups)
        self.device = rank_device(config, rank)
        self.peers: TPRanks | None = None
        self.control = control
        self.kv_sender: KVSender | None = None  # PD prefill, rank 0: set by the server's prefill role
        self.kv_port: DecodeKVPort | None = None  # PD decode: this rank's KV receiver
        self.kv_endpoints: list[str] = []  # PD decode, rank 0: every rank's receiving endpoint
        self.draft: DraftModel | None = None  # speculative decoding: this rank's draft model and pool
        self.prefill_draft: DraftModel | None = None  # PD prefill, rank 0: the draft whose KV streams along
        self.cuda_graph: CudaGraphRunner | None = None  # GPU: captured decode steps
        self.dtype = config.torch_dtype
        try:
            if rank == 0 and config.tp_size > 1:
                self.peers = TPRanks(config)
                joined_before = dist.is_initialized()
                try:
                    self.control = init_tp(config, 0, self.peers.port)
                except Exception as e:
                    if dist.is_initialized() and not joined_before:  # a half-joined group of ours
                        dist.destroy_process_group()
                    raise RuntimeError(self.peers.failure() or f"joining the TP group failed: {e}") from e
            self._build()
        except BaseException:
            self.shutdown(kill=True)  # no rank may stay behind waiting for a collective
            raise

    def _build(self) -> None:
        config = self.config
        torch.manual_seed(config.random_seed)
        self.model = load_model(
            config.model_path,
            dtype=self.dtype,
            device=self.device,
            load_format=config.load_format,
            layout=self.layout,
            seed=config.random_seed,
            config_overrides=config.model_overrides,
            tpla=TPLAOptions(norm=config.tpla_norm, pd_sep=config.tpla_pd_sep),
            transform=config.tpla_transform,
            calibration_path=config.tpla_calibration,
        )
        self.model_config = self.model.config
        self.page_size = config.resolved_page_size
        self.ckv_dim = self.model_config.kv_lora_rank // self.layout.latent_groups
        self.rope_dim = self.model_config.qk_rope_head_dim
        attn = self.model.model.layers[0].self_attn
        shape = AttentionShape(
            attn.num_local_heads, self.ckv_dim, self.rope_dim, self.page_size, self.dtype, attn.scale
        )
        self.attn_backend = create_attention_backend(config.attention_backend, self.device, shape)
        self.draft_config = self._draft_config()
        num_pages = self._profile_num_pages()
        self.kv_pool = LatentKVPool(
            self.model_config.num_hidden_layers,
            num_pages,
            self.page_size,
            self.ckv_dim,
            self.rope_dim,
            self.dtype,
            self.device,
        )
        self.allocator = PageAllocator(num_pages)
        self.kv_fingerprint = self._kv_fingerprint()
        if self.draft_config is not None and self.runs_draft:
            draft = DraftModel(
                config.speculative_draft_model_path,
                num_pages,
                self.page_size,
                self.dtype,
                self.device,
                config.attention_backend,
                self.layout,
                config.resolved_easyspec_group_size,
                config.random_seed,
                config.load_format,
            )
            self.draft_kv_fingerprint = hashlib.sha256(f"{draft.model.fingerprint}|draft".encode()).hexdigest()[:16]
            if config.speculative:
                self.draft = draft
                logger.info(
                    "speculative decoding: %s, draft %s (%d layers, groups %s), k = %d",
                    config.speculative_algorithm,
                    config.speculative_draft_model_path,
                    self.draft_config.num_hidden_layers,
                    draft.groups if self.layer_parallel_draft else "sequential",
                    config.speculative_num_draft_tokens,
                )
            else:
                self.prefill_draft = draft
                logger.info(
                    "prefilling draft %s (%d layers) for speculative decode servers",
                    config.speculative_draft_model_path,
                    self.draft_config.num_hidden_layers,
                )
        if self.device.type == "cuda" and not config.disable_cuda_graph:
            self.cuda_graph = CudaGraphRunner(
                self.model, self.attn_backend, self.kv_pool, config, self.device,
                -(-self.context_length // self.page_size),
            )
            self._collective(self.cuda_graph.capture)
        if config.disaggregation_mode == "decode":
            self.kv_port = DecodeKVPort(
                self.decode_layout(),
                self.rank,
                self.kv_pool,
                config.disaggregation_host,
                config.disaggregation_timeout,
                config.disaggregation_bootstrap_port,
                draft_pool=self.draft.kv_pool if self.draft is not None else None,
            )
            group = self.control.group if self.control is not None else None
            self.kv_endpoints = self._collective(
                lambda: gather_endpoints(self.kv_port.endpoint, group, config.tp_size)
            )
        logger.info(
            "KV cache: %d pages x %d tokens (%d tokens), %d bytes per token per rank (%d latent + %d rope dims)",
            num_pages - 1,
            self.page_size,
            self.max_total_tokens,
            self.kv_bytes_per_token,
            self.ckv_dim,
            self.rope_dim,
        )

    @property
    def runs_draft(self) -> bool:
        """Rank 0 always drafts; the other ranks only take part in layer-parallel (EasySpec) drafting.
        A PD prefill given a draft model prefills it on rank 0, for its decode servers."""
        if self.prefills_draft:
            return self.rank == 0
        return self.config.speculative and (self.rank == 0 or self.layer_parallel_draft)

    @property
    def prefills_draft(self) -> bool:
        config = self.config
        return config.disaggregation_mode == "prefill" and config.speculative_draft_model_path is not None

    @property
    def layer_parallel_draft(self) -> bool:
        return self.config.speculative_algorithm == "easyspec" and self.config.tp_size > 1

    def _draft_config(self) -> ModelConfig | None:
        """The draft's config, checked against the target's: it must speak the same vocabulary."""
        config = self.config
        if not (config.speculative or self.prefills_draft):
            return None
        path = Path(config.speculative_draft_model_path)
        draft = ModelConfig.from_json_file(path) if path.is_file() else ModelConfig.from_pretrained_dir(path)
        if draft.vocab_size != self.model_config.vocab_size:
            raise ValueError(
                f"the draft model {path} has vocab_size {draft.vocab_size}, the target "
                f"{self.model_config.vocab_size}: a draft must share the target's tokenizer"
            )
        return draft

    def _kv_fingerprint(self) -> str:
        """What a PD peer must match: the weights, the latent transform and the calibration folded in."""
        h = hashlib.sha256(f"{self.model.fingerprint}|{self.config.tpla_transform}".encode())
        if self.config.tpla_calibration is not None:
            h.update(Path(self.config.tpla_calibration).read_bytes())
        return h.hexdigest()[:16]

    def kv_spec(self) -> KVSpec:
        """The target's latent KV as a PD peer must see it (this rank's pool: whole on a prefill)."""
        return kv_spec(self.kv_pool, self.model_config.kv_lora_rank, self.kv_fingerprint)

    def draft_kv_spec(self) -> KVSpec | None:
        """The draft's latent KV, on a rank that holds the draft (decoding or prefilling it)."""
        draft = self.draft or self.prefill_draft
        if draft is None:
            return None
        return kv_spec(draft.kv_pool, draft.config.kv_lora_rank, self.draft_kv_fingerprint)

    def decode_layout(self) -> DecodeLayout:
        """What this decode rank REGISTERs (rank 0) or accepts: the target sharded T ways in g latent
        groups, and the draft, whole, on the ranks that keep one."""
        config = self.config
        draft = self.draft_kv_spec()
        ranks = range(config.tp_size) if self.layer_parallel_draft else range(1)
        return DecodeLayout(
            self.kv_spec(),
            config.tp_size,
            config.tpla_groups,
            self.page_size,
            draft=draft,
            draft_ranks=tuple(ranks) if draft is not None else (),
        )

    @property
    def kv_bytes_per_token(self) -> int:
        return LatentKVPool.bytes_per_token(
            self.model_config.num_hidden_layers, self.ckv_dim, self.rope_dim, self.dtype
        )

    @property
    def draft_kv_bytes_per_token(self) -> int:
        if self.draft_config is None or not self.runs_draft:
            return 0
        return DraftModel.bytes_per_token(self.draft_config, self.dtype)

    @property
    def max_total_tokens(self) -> int:
        return self.allocator.num_usable * self.page_size

    @property
    def context_length(self) -> int:
        return self.config.context_length or self.model_config.max_position_embeddings

    def _profile_num_pages(self) -> int:
        """Size the pool from the memory budget: measured free GPU memory, or a byte budget on CPU."""
        bytes_per_page = (self.kv_bytes_per_token + self.draft_kv_bytes_per_token) * self.page_size
        if self.device.type == "cuda":
            gc.collect()  # an engine shut down earlier in this process may still hold blocks through cycles
            torch.cuda.empty_cache()
            free, total = torch.cuda.mem_get_info(self.device)
            budget = free - total * (1.0 - self.config.mem_fraction_static)
        else:
            budget = self.config.kv_cache_bytes
        num_pages = int(budget // bytes_per_page)
        if self.config.max_total_tokens is not None:
            num_pages = min(num_pages, -(-self.config.max_total_tokens // self.page_size))
        if self.config.tp_size > 1:  # every rank must address the same pages
            n = torch.tensor([num_pages], dtype=torch.int64, device=self.device)
            self._collective(lambda: dist.all_reduce(n, op=dist.ReduceOp.MIN))
            num_pages = int(n.item())
        num_pages += 1  # page 0 is reserved
        if num_pages < 2:
            raise RuntimeError(
                f"no memory left for the KV cache ({budget / 2**20:.0f} MiB budget, "
                f"{bytes_per_page} bytes per page): raise --mem-fraction-static or --kv-cache-bytes"
            )
        return num_pages

    def _collective(self, fn: Callable[[], T]) -> T:
        """Run a step that talks to the other ranks; a dead rank becomes a clear error, not a hang."""
        try:
            return fn()
        except Exception as e:
            why = self.peers.failure() if self.peers is not None else None
            raise RuntimeError(why or f"TP rank {self.rank}: a collective failed: {e}") from e

    def forward(self, mode: ForwardMode, entries: list[BatchEntry]) -> torch.Tensor:
        """Run one step (on every rank); returns fp32 logits for the rows each entry asked for."""
        if self.control is None:
            return self._forward_local(mode, entries)
        return self._announce_and_run("step", mode, entries, self._forward_local)

    def _announce_and_run(
        self,
        op: str,
        mode: ForwardMode,
        entries: list[BatchEntry],
        run: Callable[[ForwardMode, list[BatchEntry]], torch.Tensor | None],
    ) -> torch.Tensor | None:
        """Tell the other ranks to replay `op` over `entries`, then run it here."""
        control = self.control
        assert control is not None
        step = {
            "op": op,
            "mode": mode.value,
            "entries": [[e.new_token_ids, e.prefix_len, e.pages, e.logits_for_all] for e in entries],
        }

        def announce_and_run() -> torch.Tensor | None:
            control.send(step)
            return run(mode, entries)

        return self._collective(announce_and_run)

    @torch.inference_mode()
    def _forward_local(self, mode: ForwardMode, entries: list[BatchEntry]) -> torch.Tensor:
        if self.cuda_graph is not None and self.cuda_graph.can_run(mode, entries):
            return self.cuda_graph.replay(entries)
        fb = build_forward_batch(mode, entries, self.kv_pool, self.attn_backend, self.device)
        streamed = self.kv_sender is not None and any(e.kv_room is not None for e in entries)
        if streamed:
            fb.kv_sink = LayerKVStreamer(self.kv_sender, entries)
        self.attn_backend.prepare(fb)
        logits = self.model(fb)
        if streamed and self.prefill_draft is not None:
            self._prefill_draft_and_stream([e for e in entries if e.kv_room is not None])
        return logits

    def _prefill_draft_and_stream(self, entries: list[BatchEntry]) -> None:
        """PD prefill: the draft's exact forward over the rooms' chunks, each layer streamed as it is
        written, after the target's (a decode's draft then starts at the prompt's end)."""
        assert self.prefill_draft is not None and self.kv_sender is not None
        draft = self.prefill_draft
        entries = [dataclasses.replace(e, logits_for_all=False) for e in entries]
        fb = build_forward_batch(ForwardMode.EXTEND, entries, draft.kv_pool, draft.attn_backend, self.device)
        fb.kv_sink = LayerKVStreamer(self.kv_sender, entries, draft=True)
        draft.attn_backend.prepare(fb)
        draft.model.model(fb)  # hidden states only: the decode computes its own next draft logits

    def draft_forward(self, mode: ForwardMode, entries: list[BatchEntry]) -> torch.Tensor:
        """Rank 0: run the draft model (on every rank when drafting is layer-parallel); fp32 logits of the
        rows the entries ask for. EXTEND is the exact sequential forward (draft prefill, bonus calibration);
        DECODE drafts one token per request, layer-parallel under EasySpec."""
        assert self.draft is not None and self.rank == 0
        if self.control is None or not self.layer_parallel_draft:
            return self._draft_local(mode, entries)
        return self._announce_and_run("draft", mode, entries, self._draft_local)

    def _draft_local(self, mode: ForwardMode, entries: list[BatchEntry]) -> torch.Tensor | None:
        assert self.draft is not None
        layer_parallel = mode is ForwardMode.DECODE and self.layer_parallel_draft
        return self.draft.forward(mode, entries, layer_parallel, want_logits=self.rank == 0)

    # ------------------------------------------------------------------ PD decode, rank 0

    def expect_room(self, room: int, n_tokens: int, pages: list[int], host: str, port: int | None) -> None:
        """Every rank starts accepting the room's KV into `pages`; returns once all of them do."""
        assert self.kv_port is not None and self.rank == 0
        self.kv_port.expect(room, n_tokens, pages, host, port)
        if self.control is not None:
            control = self.control
            msg = {"op": "expect", "room": room, "n_tokens": n_tokens, "pages": pages, "host": host, "port": port}
            self._collective(lambda: (control.send(msg), dist.barrier(group=control.group)))

    def await_room(self, event: RoomCompleted) -> bool:
        """Rank 0 holds the room's KV (`event`); return once every other rank holds its slice too.

        True when every rank that keeps a draft also received the draft's KV for the prompt: only then
        may the request skip prefilling its draft (draft_computed = prompt length).
        """
        assert self.kv_port is not None and self.rank == 0
        has_draft = self.kv_port.has_draft(event)
        if self.control is None:
            return has_draft
        control = self.control

        def run() -> bool:
            control.send({"op": "await", "room": event.room})
            return _all_ranks(has_draft, control)

        return self._collective(run)

    def cancel_room(self, room: int, message: str) -> None:
        assert self.kv_port is not None and self.rank == 0
        self.kv_port.receiver.cancel(room, message)
        self.kv_port.forget(room)
        if self.control is not None:
            control = self.control
            self._collective(lambda: control.send({"op": "cancel", "room": room, "message": message}))

    def serve_forever(self) -> None:
        """Ranks > 0: replay rank 0's steps until it says stop."""
        assert self.control is not None and self.rank > 0
        while True:
            msg = self.control.receive()
            op = msg["op"]
            if op == "shutdown":
                return
            if op == "expect":
                assert self.kv_port is not None
                self.kv_port.expect(msg["room"], msg["n_tokens"], msg["pages"], msg["host"], msg["port"])
                dist.barrier(group=self.control.group)
            elif op == "cancel":
                assert self.kv_port is not None
                self.kv_port.receiver.cancel(msg["room"], msg["message"])
                self.kv_port.forget(msg["room"])
            elif op == "randomize_kv":
                self._randomize_kv_local(msg["seed"])
            elif op == "await":
                assert self.kv_port is not None
                event = self.kv_port.wait_complete(msg["room"])
                _all_ranks(self.kv_port.has_draft(event), self.control)
            else:
                entries = [BatchEntry(ids, prefix, pages, bool(a)) for ids, prefix, pages, a in msg["entries"]]
                if op == "draft":
                    self._draft_local(ForwardMode(msg["mode"]), entries)
                else:
                    self._forward_local(ForwardMode(msg["mode"]), entries)

    def _leave_group(self) -> None:
        if self.control is not None and dist.is_initialized():  # only the group this runner joined
            dist.destroy_process_group()

    @torch.no_grad()
    def randomize_kv(self, seed: int) -> None:
        """Fill every rank's KV pool with random values: decode speed runs skip prefill, and a decode step's
        cost does not depend on what the cache holds (zeros, though, could flatter a kernel)."""
        if self.control is not None:
            control = self.control
            self._collective(lambda: control.send({"op": "randomize_kv", "seed": seed}))
        self._randomize_kv_local(seed)

    def _randomize_kv_local(self, seed: int) -> None:
        gen = torch.Generator(device=self.device).manual_seed(seed + self.rank)
        for t in self.kv_pool.ckv + self.kv_pool.kpe:
            t.normal_(generator=gen)

    def shutdown(self, kill: bool = False) -> None:
        """Stop the other ranks and leave the TP group (kill: without telling them, after a failed start)."""
        if self.kv_port is not None:
            self.kv_port.close()
            self.kv_port = None
        self.cuda_graph = None  # captured graphs hold work of the group's communicator: release them first
        if self.peers is not None:
            told = False
            if kill:
                self.peers.kill()
            elif self.peers.failure() is None:
                try:
                    self.control.send({"op": "shutdown"})
                    told = True
                except Exception:  # a rank already gone: nothing left to tell
                    logger.warning("TP shutdown: could not reach every rank")
            if told:  # every rank leaves the group at once (NCCL's teardown waits for its peers)
                self._leave_group()
            self.peers.join()
            self.peers = None
        self._leave_group()
        if self.device.type == "cuda":  # give the memory back: another engine may start in this process
            for name in ("model", "kv_pool", "attn_backend", "draft", "prefill_draft"):
                self.__dict__.pop(name, None)
            torch.cuda.empty_cache()


def _all_ranks(value: bool, control: ControlChannel) -> bool:
    """Whether `value` holds on every rank of the control group (a collective: every rank calls it)."""
    flag = torch.tensor([int(value)], dtype=torch.int64)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=control.group)
    return bool(flag.item())
