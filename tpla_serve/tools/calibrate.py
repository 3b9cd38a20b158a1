"""Fit TPLA's per-layer PCA bases and per-group logit scales μ on calibration text.

    python -m tpla_serve.tools.calibrate --model-path M --data FILE_OR_DIR --out calib.safetensors \\
        [--tpla-groups 2] [--tpla-transform pca|hadamard|none]

Runs exact prefill (one process) over the text and watches every layer's normalized latent ĉ and absorbed
queries q̃. PCA: the eigenvectors of the latent's second moment E[ĉĉᵀ], largest first, so the leading
groups get the most energy. μ_i: the least-squares scale of group i's partial nope logit q̃ᵢ·ĉᵢ against the
full one q̃·ĉ over all heads and causal (query, key) pairs: μ_i = Σ s·sᵢ / Σ sᵢ², fitted in the latent basis
the decode server will run (after the transform).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tpla_serve.config import TPLA_TRANSFORMS, EngineConfig
from tpla_serve.engine.model_runner import ModelRunner
from tpla_serve.engine.tokenizer import load_tokenizer
from tpla_serve.forward_batch import BatchEntry, ForwardMode, build_forward_batch
from tpla_serve.tpla.calibration import Calibration

logger = logging.getLogger(__name__)
TEXT_SUFFIXES = (".txt", ".md", ".py", ".json", ".rst")


class SecondMoment:
    """Σ ĉĉᵀ per layer, in fp64."""

    def __init__(self, num_layers: int, rank: int) -> None:
        self.sums = torch.zeros(num_layers, rank, rank, dtype=torch.float64)

    def observe(self, layer: int, c_hat: torch.Tensor, q_abs: torch.Tensor) -> None:
        c = c_hat.double().cpu()
        self.sums[layer] += c.T @ c

    def bases(self) -> list[torch.Tensor]:
        out = []
        for s in self.sums:
            eigvals, eigvecs = torch.linalg.eigh(s)
            out.append(eigvecs.flip(-1).float())  # columns by decreasing variance
        return out


class GroupLogitFit:
    """Accumulates Σ s·sᵢ and Σ sᵢ² per layer and group over causal pairs of one sequence at a time."""

    def __init__(self, num_layers: int, rank: int, groups: int) -> None:
        self.groups, self.width = groups, rank // groups
        self.cross = torch.zeros(num_layers, groups, dtype=torch.float64)
        self.square = torch.zeros(num_layers, groups, dtype=torch.float64)

    def observe(self, layer: int, c_hat: torch.Tensor, q_abs: torch.Tensor) -> None:
        c, q = c_hat.double().cpu(), q_abs.double().cpu()  # [n, r], [n, H, r]
        n = c.shape[0]
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        parts = [
            torch.einsum("qhd,td->hqt", q[..., i * self.width : (i + 1) * self.width],
                         c[:, i * self.width : (i + 1) * self.width])[:, causal]
            for i in range(self.groups)
        ]
        full = sum(parts)
        for i, part in enumerate(parts):
            self.cross[layer, i] += (full * part).sum()
            self.square[layer, i] += (part * part).sum()

    def scales(self) -> torch.Tensor:
        return (self.cross / self.square.clamp(min=1e-30)).float()


def read_token_sequences(tokenizer, data: str, seq_len: int, max_tokens: int) -> list[list[int]]:
    """The text of a file, or of a directory's text files in sorted order, cut into seq_len-token pieces."""
    path = Path(data)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
    elif path.is_file():
        files = [path]
    else:
        raise FileNotFoundError(f"calibration data {data} does not exist")
    tokens: list[int] = []
    for f in files:
        tokens += tokenizer.encode(f.read_text(errors="replace"))
        if len(tokens) >= max_tokens:
            break
    tokens = tokens[:max_tokens]
    seqs = [tokens[i : i + seq_len] for i in range(0, len(tokens) - 1, seq_len)]
    seqs = [s for s in seqs if len(s) > 1]
    if not seqs:
        raise ValueError(f"{data} holds no text to calibrate on")
    return seqs


@torch.inference_mode()
def run_prefill(runner: ModelRunner, seqs: list[list[int]], observer, desc: str) -> None:
    pages = runner.allocator.alloc(-(-max(len(s) for s in seqs) // runner.page_size))
    if pages is None:
        raise RuntimeError("the KV budget cannot hold one calibration sequence; lower --seq-len")
    try:
        for seq in tqdm(seqs, desc=desc, unit="seq"):
            fb = build_forward_batch(
                ForwardMode.EXTEND, [BatchEntry(seq, 0, pages)], runner.kv_pool, runner.attn_backend,
                runner.device, capture=observer,
            )
            runner.model(fb)
    finally:
        runner.allocator.free(pages)


def calibrate(
    model_path: str, data: str, groups: int, transform: str, seq_len: int = 512, max_tokens: int = 65536,
    dtype: str = "float32", device: str = "auto",
) -> Calibration:
    if transform not in TPLA_TRANSFORMS:
        raise ValueError(f"--tpla-transform must be one of {', '.join(TPLA_TRANSFORMS)}")
    base = "hadamard" if transform == "hadamard" else "none"
    config = EngineConfig(
        model_path=model_path, dtype=dtype, device=device, tpla_transform=base, max_total_tokens=seq_len,
    )
    runner = ModelRunner(config)
    model, cfg = runner.model, runner.model_config
    if cfg.kv_lora_rank % groups:
        raise ValueError(f"kv_lora_rank {cfg.kv_lora_rank} is not divisible by --tpla-groups {groups}")
    seqs = read_token_sequences(load_tokenizer(model_path), data, seq_len, max_tokens)
    logger.info("calibrating on %d sequences, %d tokens", len(seqs), sum(map(len, seqs)))
    bases: list[torch.Tensor] = []
    if transform == "pca":
        model.transform_latent([None] * cfg.num_hidden_layers, fold_norm=True, calibration=None)
        moments = SecondMoment(cfg.num_hidden_layers, cfg.kv_lora_rank)
        run_prefill(runner, seqs, moments, "latent covariance")
        bases = moments.bases()
        model.transform_latent(list(bases), fold_norm=True, calibration=None)
        model.post_load_weights()
    fit = GroupLogitFit(cfg.num_hidden_layers, cfg.kv_lora_rank, groups)
    run_prefill(runner, seqs, fit, "logit scales")
    return Calibration(model.fingerprint, groups, transform, fit.scales(), tuple(bases))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--data", required=True, help="a text file or a directory of text files")
    parser.add_argument("--out", required=True)
    parser.add_argument("--tpla-groups", type=int, default=2)
    parser.add_argument("--tpla-transform", default="pca", choices=list(TPLA_TRANSFORMS))
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=65536)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    calib = calibrate(
        args.model_path, args.data, args.tpla_groups, args.tpla_transform, args.seq_len, args.max_tokens,
        args.dtype, args.device,
    )
    calib.save(args.out)
    mu = ", ".join(f"{v:.3f}" for v in calib.mu.flatten().tolist()[: 4 * args.tpla_groups])
    logger.info("wrote %s (model %s, g=%d, %s; mu: %s ...)", args.out, calib.model_fingerprint,
                args.tpla_groups, args.tpla_transform, mu)


if __name__ == "__main__":
    main()
