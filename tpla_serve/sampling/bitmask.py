"""Token bitmasks of constrained rows, applied to fp32 logits on the device.

A grammar matcher (tpla_serve.grammar) says which tokens may come next as a bitmask, xgrammar's layout:
int32 words, bit b of word w allowing token 32·w + b. Only the constrained rows of a batch carry one, so
a batch where few requests have a grammar pays only for those; a forbidden token's logit becomes -inf
before temperature, truncation and logprobs, as SGLang applies its vocab mask. Unpacking is plain torch
(byte-wise shifts and a masked fill, one byte per token in between), so it runs on any device without a
host sync.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tpla_serve.sampling.penalties import host_to_device

BITS_PER_WORD = 32


def bitmask_width(vocab_size: int) -> int:
    """int32 words per row of a vocabulary's bitmask."""
    return -(-vocab_size // BITS_PER_WORD)


@dataclass(frozen=True)
class TokenBitmask:
    """The allowed tokens of R rows of a batch, on the device."""

    rows: torch.Tensor  # [R] int64 rows of the batch
    bits: torch.Tensor  # [R, bitmask_width(V)] int32

    @classmethod
    def to_device(cls, rows: list[int], host_bits: torch.Tensor, device: torch.device) -> TokenBitmask:
        """host_bits [R, W] int32, filled on the host by the rows' matchers; a pinned buffer is copied
        without stalling the device queue."""
        if host_bits.dim() != 2 or host_bits.shape[0] != len(rows) or host_bits.dtype != torch.int32:
            got = f"{host_bits.dtype} {tuple(host_bits.shape)}"
            raise ValueError(f"host_bits must be int32 [{len(rows)}, W], got {got}")
        bits = host_bits.to(device, non_blocking=device.type == "cuda" and host_bits.is_pinned())
        return cls(host_to_device(rows, torch.int64, device), bits)

    def _bits_per_token(self, vocab_size: int) -> torch.Tensor:
        """[R, V] uint8, 1 where the row's grammar allows the token. The int32 words are read as bytes in
        little-endian order, as x86-64, Arm and GPUs store them: byte k of word w holds tokens 32·w + 8·k ..."""
        shifts = torch.arange(8, dtype=torch.uint8, device=self.bits.device)
        unpacked = (self.bits.view(torch.uint8).unsqueeze(-1) >> shifts) & 1
        return unpacked.view(self.bits.shape[0], -1)[:, :vocab_size]

    def allowed(self, vocab_size: int) -> torch.Tensor:
        """[R, V] bool: True where the row's grammar allows the token."""
        return self._bits_per_token(vocab_size).bool()

    def apply(self, logits: torch.Tensor) -> None:
        """Set the forbidden tokens' logits of the masked rows of `logits` [B, V] to -inf, in place."""
        sub = logits.index_select(0, self.rows)
        sub.masked_fill_(self._bits_per_token(logits.shape[1]) == 0, float("-inf"))
        logits.index_copy_(0, self.rows, sub)
