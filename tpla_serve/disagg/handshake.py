"""What a prefill and a decode server must agree on before latent KV may flow between them.

`KVSpec` describes one model's latent cache (identical on both sides, or the bytes are meaningless);
`DecodeLayout` adds how the decode server shards it (TPLA: T ranks, g latent groups), which decides
which slice of each layer every decode rank receives.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType

import torch

from tpla_serve.cache.pool import LatentKVPool
from tpla_serve.tpla.layout import ShardLayout

KV_DTYPES = MappingProxyType(
    {
        "bfloat16": torch.bfloat16,
        "float16": torch.float16,
        "float32": torch.float32,
        "float8_e4m3fn": torch.float8_e4m3fn,
    }
)
MAX_FINGERPRINT_LEN = 256


def dtype_name(dtype: torch.dtype) -> str:
    """The wire name of a KV dtype (the inverse of KV_DTYPES)."""
    for name, value in KV_DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"kv dtype {dtype} is not transferable; supported: {', '.join(KV_DTYPES)}")


@dataclass(frozen=True)
class KVSpec:
    """One model's latent KV per token and layer: ĉ (kv_lora_rank wide) and k_pe (rope_dim wide).

    `fingerprint` identifies weights + TPLA transform: equal shapes with different rotations would
    silently corrupt every answer, so the handshake compares it too.
    """

    num_layers: int
    kv_lora_rank: int
    rope_dim: int
    dtype: str
    fingerprint: str

    def __post_init__(self) -> None:
        for name in ("num_layers", "kv_lora_rank", "rope_dim"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.dtype not in KV_DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(KV_DTYPES)}, got {self.dtype!r}")
        if not isinstance(self.fingerprint, str) or len(self.fingerprint) > MAX_FINGERPRINT_LEN:
            raise ValueError(f"fingerprint must be a str of at most {MAX_FINGERPRINT_LEN} characters")

    @property
    def torch_dtype(self) -> torch.dtype:
        return KV_DTYPES[self.dtype]

    @property
    def itemsize(self) -> int:
        return self.torch_dtype.itemsize

    def check_layer_rows(self, layer: int, token_start: int, ckv: torch.Tensor, kpe: torch.Tensor) -> None:
        """A layer's rows as an engine hands them to the sender: ĉ [n, r] and k_pe [n, d_r] of this spec."""
        if type(layer) is not int or not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be an int in [0, {self.num_layers}), got {layer!r}")
        if type(token_start) is not int or token_start < 0:
            raise ValueError(f"token_start must be a non-negative int, got {token_start!r}")
        n = ckv.shape[0] if ckv.dim() == 2 else -1
        for name, t, width in (("ckv", ckv, self.kv_lora_rank), ("kpe", kpe, self.rope_dim)):
            if t.dim() != 2 or t.shape[1] != width or t.shape[0] != n or n < 1:
                raise ValueError(f"{name} must be [n >= 1, {width}] with the same n as ckv, got {tuple(t.shape)}")
            if t.dtype != self.torch_dtype:
                raise ValueError(f"{name} dtype must be {self.torch_dtype}, got {t.dtype}")

    def mismatch(self, other: KVSpec, what: str) -> str | None:
        """A message naming the first field where `other` (the decode's) differs from self, or None."""
        for name in ("fingerprint", "kv_lora_rank", "rope_dim", "num_layers", "dtype"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                return f"{what} {name} mismatch: prefill has {mine!r}, decode has {theirs!r}"
        return None


@dataclass(frozen=True)
class DecodeLayout:
    """A decode server's KV layout: its model's KVSpec, how it shards the latent, and an optional draft
    model whose KV the decode server also wants (speculative decoding).

    The draft is replicated, not sharded: each rank in `draft_ranks` keeps the draft's whole latent, the
    others none. On the wire the draft's layer i travels as layer kv.num_layers + i.
    """

    kv: KVSpec
    tp_size: int
    latent_groups: int
    page_size: int
    draft: KVSpec | None = None
    draft_ranks: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if type(self.page_size) is not int or self.page_size < 1:
            raise ValueError(f"page_size must be a positive int, got {self.page_size!r}")
        # Validates tp_size / latent_groups and that g divides kv_lora_rank.
        self.rank_layout(0).latent_slice(self.kv.kv_lora_rank)
        ranks = self.draft_ranks
        if not isinstance(ranks, tuple) or any(type(r) is not int for r in ranks):
            raise ValueError(f"draft_ranks must be a tuple of ints, got {ranks!r:.80}")
        if (self.draft is None) != (not ranks):
            raise ValueError("draft_ranks must name at least one rank exactly when a draft is given")
        if list(ranks) != sorted(set(ranks)) or (ranks and not 0 <= ranks[0] <= ranks[-1] < self.tp_size):
            raise ValueError(f"draft_ranks must be increasing ranks in [0, {self.tp_size}), got {ranks!r:.80}")

    def rank_layout(self, rank: int) -> ShardLayout:
        return ShardLayout(tp_size=self.tp_size, tp_rank=rank, latent_groups=self.latent_groups)

    @property
    def ckv_width(self) -> int:
        """Latent dims each decode rank keeps (r / g)."""
        return self.kv.kv_lora_rank // self.latent_groups

    def latent_slice(self, rank: int) -> tuple[int, int]:
        return self.rank_layout(rank).latent_slice(self.kv.kv_lora_rank)

    def token_bytes(self) -> int:
        """Bytes of one token of one layer as one decode rank receives it (ĉ slice + k_pe)."""
        return (self.ckv_width + self.kv.rope_dim) * self.kv.itemsize

    def wants_draft(self, rank: int) -> bool:
        return rank in self.draft_ranks

    def num_wire_layers(self, rank: int) -> int:
        """Layers `rank` receives: the target's, then the draft's when the rank keeps a draft pool."""
        draft = self.draft.num_layers if self.draft is not None and self.wants_draft(rank) else 0
        return self.kv.num_layers + draft


def layout_mismatch(kv: KVSpec, layout: DecodeLayout) -> str | None:
    """Why a prefill with target KV `kv` cannot serve a decode with `layout` (the room fails), or None."""
    return kv.mismatch(layout.kv, "model")


def draft_mismatch(draft: KVSpec | None, layout: DecodeLayout) -> str | None:
    """Why a prefill with `draft` cannot send the draft KV a decode with `layout` wants, or None when it
    can or the decode wants none. The room still goes ahead: the decode prefills its draft itself."""
    if layout.draft is None:
        return None
    if draft is None:
        return "decode wants draft-model KV, but the prefill server has no draft model"
    return draft.mismatch(layout.draft, "draft model")


def pool_kv_spec(pool: LatentKVPool, kv_lora_rank: int, fingerprint: str) -> KVSpec:
    """The KVSpec of the model whose cache is `pool` (kv_lora_rank: the whole latent, also where the pool
    keeps a TPLA slice of it)."""
    return KVSpec(pool.num_layers, kv_lora_rank, pool.rope_dim, dtype_name(pool.dtype), fingerprint)
