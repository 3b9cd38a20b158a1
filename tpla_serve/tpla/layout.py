"""Where a decode rank's share of the model and the latent KV cache lives.

One object answers every "which part is mine?" question, so that the KV cache, the weight loader and the
attention backend can never disagree. TP size T, latent groups g (g | T): rank k belongs to latent group
k // (T/g), keeps that group's r/g latent dims, and serves head shard k % (T/g) of the H heads.
g = 1 is plain MLA-TP (every rank keeps the whole latent); T = 1 is a single process.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ShardLayout:
    tp_size: int = 1
    tp_rank: int = 0
    latent_groups: int = 1

    def __post_init__(self) -> None:
        if self.tp_size < 1:
            raise ValueError(f"tp_size must be >= 1, got {self.tp_size}")
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"tp_rank {self.tp_rank} is outside [0, {self.tp_size})")
        if self.latent_groups < 1 or self.tp_size % self.latent_groups != 0:
            raise ValueError(
                f"tpla_groups ({self.latent_groups}) must be >= 1 and divide tp_size ({self.tp_size})"
            )

    @property
    def ranks_per_group(self) -> int:
        return self.tp_size // self.latent_groups

    @property
    def group(self) -> int:
        """The latent group this rank belongs to."""
        return self.tp_rank // self.ranks_per_group

    @property
    def head_shard(self) -> int:
        """Index of this rank's head shard inside its latent group."""
        return self.tp_rank % self.ranks_per_group

    def head_range(self, num_heads: int) -> tuple[int, int]:
        """Heads [start, end) this rank attends with; each group covers all heads."""
        if num_heads % self.ranks_per_group != 0:
            raise ValueError(
                f"num_attention_heads ({num_heads}) must be divisible by tp_size / tpla_groups "
                f"({self.ranks_per_group})"
            )
        per_rank = num_heads // self.ranks_per_group
        return self.head_shard * per_rank, (self.head_shard + 1) * per_rank

    def latent_slice(self, kv_lora_rank: int) -> tuple[int, int]:
        """Latent dims [start, end) this rank caches and attends over."""
        if kv_lora_rank % self.latent_groups != 0:
            raise ValueError(
                f"kv_lora_rank ({kv_lora_rank}) must be divisible by tpla_groups ({self.latent_groups})"
            )
        width = kv_lora_rank // self.latent_groups
        return self.group * width, (self.group + 1) * width

    def shard_range(self, size: int) -> tuple[int, int]:
        """Plain TP split [start, end) of a dimension over all T ranks (MLP, experts, vocab)."""
        if size % self.tp_size != 0:
            raise ValueError(f"dimension {size} is not divisible by tp_size {self.tp_size}")
        per_rank = size // self.tp_size
        return self.tp_rank * per_rank, (self.tp_rank + 1) * per_rank
