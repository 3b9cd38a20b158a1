"""Token streams and batches.

Each file becomes BOS + tokens + EOS and the files are concatenated into one stream. Training samples random
windows of the stream (a seeded generator, so batches depend only on the seed); evaluation walks it in
non-overlapping windows so that every token after the first is scored exactly once.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from training.corpus import SourceFile


def encode_files(tokenizer: PreTrainedTokenizerBase, files: Sequence[SourceFile]) -> torch.Tensor:
    """Tokenize files into one int64 stream, each framed by BOS ... EOS."""
    if not files:
        raise ValueError("files: empty")
    encodings = tokenizer.backend_tokenizer.encode_batch([f.text for f in files], add_special_tokens=False)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pieces = [torch.tensor([bos, *enc.ids, eos], dtype=torch.int64) for enc in encodings]
    return torch.cat(pieces)


class WindowSampler:
    """Random windows of `seq_len + 1` tokens (inputs and shifted labels) from a token stream."""

    def __init__(self, stream: torch.Tensor, seq_len: int, batch_size: int, seed: int) -> None:
        if stream.dim() != 1:
            raise ValueError(f"stream: must be 1-D, got shape {tuple(stream.shape)}")
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len and batch_size: must be >= 1, got {seq_len}, {batch_size}")
        if stream.numel() <= seq_len + 1:
            raise ValueError(f"stream: {stream.numel()} tokens is too short for seq_len {seq_len}")
        self.stream = stream
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self._offsets = torch.arange(seq_len + 1)

    def next_batch(self) -> torch.Tensor:
        """A [batch_size, seq_len + 1] int64 tensor."""
        high = self.stream.numel() - self.seq_len - 1
        starts = torch.randint(0, high + 1, (self.batch_size,), generator=self.generator)
        return self.stream[starts[:, None] + self._offsets]


def eval_windows(stream: torch.Tensor, seq_len: int, batch_size: int) -> Iterator[torch.Tensor]:
    """Non-overlapping [n, seq_len + 1] windows covering the stream; the shorter tail comes last, alone."""
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"seq_len and batch_size: must be >= 1, got {seq_len}, {batch_size}")
    full = (stream.numel() - 1) // seq_len
    starts = [i * seq_len for i in range(full)]
    for i in range(0, len(starts), batch_size):
        yield torch.stack([stream[s : s + seq_len + 1] for s in starts[i : i + batch_size]])
    tail_start = full * seq_len
    if stream.numel() - tail_start >= 2:
        yield stream[tail_start:].unsqueeze(0)
