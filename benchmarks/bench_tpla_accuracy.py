"""TPLA accuracy in decode mode: exact-MLA prefill of a prefix, then teacher-forced decode of its continuation.

    python benchmarks/bench_tpla_accuracy.py [--model-path DIR] [--text FILE] [--samples 16]
        [--prefix-len 256] [--continuation-len 64] [--groups 2 4] [--calib-tokens 8192]

For each configuration the script builds one ModelRunner (T gloo ranks, fp32, CPU) and runs every sample
through it: one prefill step for all prompts, then one decode step per continuation token with every sample
in the batch, the path a decode server runs (DESIGN §3, pd-sep). It reports the continuation's perplexity
and the mean per-token KL(p_MLA || p_config) to exact MLA (g = 1, T = 1), for TPLA g ∈ {2, 4} (T = g) ×
transform {none, hadamard, pca} × norm {exact, local} × logit scale μ {1, calibrated}, plus the paper's
ablation without pd-sep (prompt tokens through TPLA too) for each transform's best setting at each g, and
how each transform spreads the latent's energy over the groups.

Evaluation text: the held-out split of the running interpreter's standard library (training.corpus), or
--text FILE. Calibration (PCA bases, μ) runs tpla_serve.tools.calibrate on training-split files, disjoint
from the held-out ones, and is cached by model fingerprint and settings under --cache-dir.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import math
import os
import platform
import random
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))
from common import write_result

from tpla_serve.config import DEFAULT_MODEL_PATH, EngineConfig
from tpla_serve.forward_batch import BatchEntry, ForwardMode
from tpla_serve.engine.model_runner import ModelRunner
from tpla_serve.engine.tokenizer import load_tokenizer
from tpla_serve.tools.calibrate import calibrate, run_prefill
from tpla_serve.tpla.calibration import Calibration
from tpla_serve.tools.teacher_forcing import teacher_forced_logits
from training.corpus import CorpusSplit, load_split

logger = logging.getLogger("bench_tpla_accuracy")
TRANSFORM_ORDER = ("none", "hadamard", "pca")
NORM_ORDER = ("exact", "local")


@dataclass(frozen=True)
class Variant:
    """One row of the table: how many ranks, how the latent is split, and how TPLA attends."""

    tp: int = 1
    groups: int = 1
    transform: str = "none"
    norm: str = "exact"
    calibrated_mu: bool = False
    pd_sep: bool = True

    @property
    def is_reference(self) -> bool:
        return self.groups == 1

    @property
    def label(self) -> str:
        if self.is_reference:
            return "MLA (exact)"
        mu = "μ calibrated" if self.calibrated_mu else "μ=1"
        sep = "" if self.pd_sep else ", no pd-sep"
        return f"TPLA g={self.groups}: {self.transform}, {self.norm} norm, {mu}{sep}"


@dataclass(frozen=True)
class Score:
    nll: float  # mean negative log-likelihood of the continuation tokens
    kl: float  # mean per-token KL(p_MLA || p_variant), nats
    top1: float  # fraction of positions whose argmax equals exact MLA's
    kv_bytes: int  # per rank per token
    seconds: float

    @property
    def ppl(self) -> float:
        return math.exp(self.nll)


# ---------------------------------------------------------------------------------------------- text


def eval_samples(tokenizer, texts: list[str], n: int, length: int) -> list[list[int]]:
    """n windows of `length` tokens, each inside one file (BOS-framed as in training), spread evenly over
    all non-overlapping windows of all files so that many files contribute."""
    candidates: list[list[int]] = []
    for text in texts:
        ids = [tokenizer.bos_token_id, *tokenizer.encode(text, add_special_tokens=False)]
        candidates += [ids[i : i + length] for i in range(0, len(ids) - length + 1, length)]
    if len(candidates) < n:
        raise ValueError(f"--samples {n}: the text holds only {len(candidates)} windows of {length} tokens")
    return [candidates[(2 * k + 1) * len(candidates) // (2 * n)] for k in range(n)]


def calibration_text(split: CorpusSplit, min_chars: int, seed: int) -> tuple[str, int]:
    """Training-split files in a seeded random order, concatenated until min_chars; and how many."""
    files = list(split.train)
    random.Random(seed).shuffle(files)
    chosen, size = [], 0
    for f in files:
        chosen.append(f.text)
        size += len(f.text)
        if size >= min_chars:
            break
    return "\n".join(chosen), len(chosen)


# ------------------------------------------------------------------------------------------ calibration


class CalibrationStore:
    """Calibration files per (g, transform), made once by tpla_serve.tools.calibrate and kept on disk."""

    def __init__(self, args: argparse.Namespace, fingerprint: str, text: str) -> None:
        self.args, self.fingerprint, self.directory = args, fingerprint, args.cache_dir
        self.directory.mkdir(parents=True, exist_ok=True)
        text_hash = hashlib.sha256(text.encode()).hexdigest()[:16]
        self.text_path = self.directory / f"calib_text_{text_hash}.txt"
        self.text_path.write_text(text)
        self.settings = f"{fingerprint}|{text_hash}|{args.calib_tokens}|{args.calib_seq_len}"
        self.loaded: dict[tuple[int, str], Calibration] = {}

    def _key(self, groups: int, transform: str) -> str:
        return hashlib.sha256(f"{self.settings}|{groups}|{transform}".encode()).hexdigest()[:16]

    def calibrated(self, groups: int, transform: str) -> tuple[Path, Calibration]:
        path = self.directory / f"calib_g{groups}_{transform}_{self._key(groups, transform)}.safetensors"
        if (groups, transform) not in self.loaded:
            if path.is_file():
                calib = Calibration.load(path, self.fingerprint, groups, transform)
                logger.info("calibration g=%d %s: cached %s", groups, transform, path.name)
            else:
                start = time.perf_counter()
                calib = calibrate(
                    self.args.model_path,
                    str(self.text_path),
                    groups,
                    transform,
                    seq_len=self.args.calib_seq_len,
                    max_tokens=self.args.calib_tokens,
                    dtype="float32",
                    device="cpu",
                )
                calib.save(path)
                logger.info("calibration g=%d %s: %.0f s", groups, transform, time.perf_counter() - start)
            self.loaded[(groups, transform)] = calib
        return path, self.loaded[(groups, transform)]

    def unit_mu(self, groups: int, bases_of: int | None = None) -> Path:
        """The PCA bases (fitted with `bases_of` groups, default `groups`; they do not depend on g) with
        μ = 1, for a `groups`-group runner: pca needs its bases even where the scales are not calibrated."""
        source = groups if bases_of is None else bases_of
        _, calib = self.calibrated(source, "pca")
        path = self.directory / f"calib_g{groups}_pca_unit_{self._key(source, 'pca')}.safetensors"
        if not path.is_file():
            mu = torch.ones(calib.mu.shape[0], groups)
            Calibration(calib.model_fingerprint, groups, "pca", mu, calib.bases).save(path)
        return path

    def path_for(self, v: Variant) -> str | None:
        if v.calibrated_mu:
            return str(self.calibrated(v.groups, v.transform)[0])
        if v.transform == "pca":
            return str(self.unit_mu(v.groups))
        return None


# ------------------------------------------------------------------------------------------- evaluation


def set_threads(threads_per_rank: int) -> None:
    """Every rank (the spawned ones read OMP_NUM_THREADS when torch starts) and in-process calibration.
    One thread by default: T ranks share a few cores, and OpenMP's spin-waiting collapses once cores are
    oversubscribed or shared with other work."""
    os.environ["OMP_NUM_THREADS"] = str(threads_per_rank)
    torch.set_num_threads(threads_per_rank)


@torch.inference_mode()
def decode_mode_logits(runner: ModelRunner, samples: list[list[int]], prefix_len: int) -> torch.Tensor:
    """[samples, continuation, vocab] fp32: teacher_forced_logits for every sample at once, one decode
    token per sample per step (as a decode server batches requests)."""
    cont_len = len(samples[0]) - prefix_len
    pages = []
    try:
        for s in samples:
            p = runner.allocator.alloc(-(-len(s) // runner.page_size))
            if p is None:
                raise RuntimeError(f"the KV pool cannot hold {len(samples)} x {len(s)} tokens")
            pages.append(p)
        rows = [
            runner.forward(
                ForwardMode.EXTEND, [BatchEntry(s[:prefix_len], 0, p) for s, p in zip(samples, pages)]
            )
        ]
        for i in range(cont_len - 1):
            pos = prefix_len + i
            rows.append(
                runner.forward(
                    ForwardMode.DECODE, [BatchEntry([s[pos]], pos, p) for s, p in zip(samples, pages)]
                )
            )
        return torch.stack(rows, dim=1).float().cpu()
    finally:
        for p in pages:
            runner.allocator.free(p)


def score(
    logits: torch.Tensor, ref_logp: torch.Tensor, targets: torch.Tensor, kv_bytes: int, seconds: float
) -> Score:
    logp = torch.log_softmax(logits.double(), dim=-1)
    nll = -logp.gather(-1, targets[..., None]).mean().item()
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1).mean().item()
    top1 = (logp.argmax(-1) == ref_logp.argmax(-1)).double().mean().item()
    return Score(nll, max(kl, 0.0), top1, kv_bytes, seconds)


@dataclass(frozen=True)
class Run:
    logits: torch.Tensor  # [samples, continuation, vocab] fp32
    kv_bytes: int  # per rank per token
    fingerprint: str  # of the untransformed weights, which names the calibration files
    single_gap: float | None  # max |Δlogit| of the batched run vs teacher_forced_logits on sample 0


def run_variant(
    v: Variant,
    args: argparse.Namespace,
    samples: list[list[int]],
    calib: CalibrationStore | None,
    check_single: bool,
) -> Run:
    """Every sample under one configuration, on one ModelRunner built for it (T ranks start once)."""
    config = EngineConfig(
        model_path=args.model_path,
        dtype="float32",
        device="cpu",
        tp_size=v.tp,
        tpla_groups=v.groups,
        tpla_norm=v.norm,
        tpla_transform=v.transform,
        tpla_pd_sep=v.pd_sep,
        tpla_calibration=calib.path_for(v) if calib is not None else None,
        max_total_tokens=len(samples) * (len(samples[0]) + 16),
    )
    runner = ModelRunner(config)
    try:
        logits = decode_mode_logits(runner, samples, args.prefix_len)
        gap = None
        if check_single:
            one = teacher_forced_logits(runner, samples[0][: args.prefix_len], samples[0][args.prefix_len :])
            gap = (one - logits[0]).abs().max().item()
        return Run(logits, runner.kv_bytes_per_token, runner.model.fingerprint, gap)
    finally:
        runner.shutdown()


class SliceEnergy:
    """Per layer, the share of the cached latent's second moment Σ‖ĉ‖² that falls in each group's slice:
    how evenly a transform spreads the latent over the groups that TPLA attends separately."""

    def __init__(self, num_layers: int, groups: int) -> None:
        self.groups = groups
        self.sums = torch.zeros(num_layers, groups, dtype=torch.float64)

    def observe(self, layer: int, c_hat: torch.Tensor, q_abs: torch.Tensor) -> None:
        self.sums[layer] += c_hat.double().cpu().pow(2).sum(0).view(self.groups, -1).sum(1)

    def shares(self) -> torch.Tensor:
        return self.sums / self.sums.sum(1, keepdim=True)


def latent_energy(
    args: argparse.Namespace, samples: list[list[int]], calib: CalibrationStore, groups: int, transform: str
) -> torch.Tensor:
    """[layers, groups] energy shares of the evaluation prompts' latents in the basis `transform` caches."""
    path = str(calib.unit_mu(1, bases_of=groups)) if transform == "pca" else None
    config = EngineConfig(
        model_path=args.model_path,
        dtype="float32",
        device="cpu",
        tpla_transform=transform,
        tpla_calibration=path,
        max_total_tokens=args.prefix_len + 16,
    )
    runner = ModelRunner(config)
    observer = SliceEnergy(runner.model_config.num_hidden_layers, groups)
    run_prefill(runner, [s[: args.prefix_len] for s in samples], observer, f"latent energy ({transform})")
    return observer.shares()


def grid(groups: list[int], transforms: list[str]) -> list[Variant]:
    return [
        Variant(tp=g, groups=g, transform=t, norm=n, calibrated_mu=mu)
        for g in groups
        for t in transforms
        for n in NORM_ORDER
        for mu in (False, True)
    ]


# ------------------------------------------------------------------------------------------------ report


def render(
    args: argparse.Namespace,
    results: list[tuple[Variant, Score]],
    text_desc: str,
    calib_desc: str,
    calibs: dict[tuple[int, str], Calibration],
    energy: dict[str, torch.Tensor],
    energy_groups: int,
    checks: list[str],
    seconds: float,
    n_tokens: int,
) -> str:
    ref = results[0][1]
    lines = [
        (
            f"Model: `{display_path(args.model_path)}`, fp32 weights and compute, CPU, T gloo ranks (T = g), "
            f"{args.threads_per_rank} thread(s) per rank.  "
        ),
        (
            f"Evaluation text: {text_desc}; {args.samples} samples of {args.prefix_len} prompt tokens (exact-MLA "
            f"prefill) + {args.continuation_len} teacher-forced continuation tokens through the decode path, "
            f"{n_tokens} scored tokens per row.  "
        ),
        (
            f"Calibration text: {calib_desc}; {args.calib_tokens} tokens in {args.calib_seq_len}-token sequences "
            "(`tpla_serve.tools.calibrate`).  "
        ),
        f"Runtime: {seconds / 60:.1f} min.  ",
        f"Command: `python {shlex.join(['benchmarks/bench_tpla_accuracy.py', *sys.argv[1:]])}`",
        "",
        (
            "KL: mean over continuation tokens of KL(p_MLA ‖ p_row) in nats, against exact MLA (g = 1, T = 1). "
            "Top-1: share of positions whose argmax equals exact MLA's. KV: cached bytes per token per rank "
            "(all layers, fp32). The first continuation token's distribution comes from the prefill, exact under "
            "pd-sep."
        ),
        "",
        "| configuration | T | KV B/token/rank | perplexity | Δ ppl | KL (nats) | top-1 = MLA |",
        "|---|---|---|---|---|---|---|",
    ]
    for v, s in results:
        delta = "—" if v.is_reference else f"{100 * (s.ppl / ref.ppl - 1):+.2f}%"
        kl = "0" if v.is_reference else f"{s.kl:.4f}"
        top1 = "100%" if v.is_reference else f"{100 * s.top1:.1f}%"
        lines.append(f"| {v.label} | {v.tp} | {s.kv_bytes:,} | {s.ppl:.3f} | {delta} | {kl} | {top1} |")
    if calibs:
        lines += [
            "",
            "Calibrated logit scales μ (per layer and group):",
            "",
            "| g | transform | μ min | μ mean | μ max | group 0 mean | last group mean |",
            "|---|---|---|---|---|---|---|",
        ]
        for (g, t), c in sorted(calibs.items(), key=lambda kv: (kv[0][0], TRANSFORM_ORDER.index(kv[0][1]))):
            mu = c.mu
            lines.append(
                f"| {g} | {t} | {mu.min():.3f} | {mu.mean():.3f} | {mu.max():.3f} | "
                f"{mu[:, 0].mean():.3f} | {mu[:, -1].mean():.3f} |"
            )
    if energy:
        lines += [
            "",
            (
                f"Share of the evaluation prompts' cached latent second moment Σ‖ĉ‖² in each g = {energy_groups} "
                "group slice, mean over layers [min–max]:"
            ),
            "",
            "| transform | " + " | ".join(f"group {i}" for i in range(energy_groups)) + " |",
            "|---|" + "---|" * energy_groups,
        ]
        for t, e in energy.items():
            cells = [
                f"{e[:, i].mean():.3f} [{e[:, i].min():.3f}–{e[:, i].max():.3f}]"
                for i in range(energy_groups)
            ]
            lines.append(f"| {t} | " + " | ".join(cells) + " |")
    if checks:
        lines += [
            "",
            "Batched decode vs `teacher_forced_logits` (one sample, one request per step), max |Δlogit|: "
            + "; ".join(checks)
            + ".",
        ]
    return "\n".join(lines)


def display_path(path: str) -> str:
    p = Path(path).resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else p.name


# -------------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", default=DEFAULT_MODEL_PATH)
    p.add_argument(
        "--text", type=Path, default=None, help="evaluation text file (default: held-out stdlib files)"
    )
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--prefix-len", type=int, default=256)
    p.add_argument("--continuation-len", type=int, default=64)
    p.add_argument("--groups", type=int, nargs="+", default=[2, 4], help="latent groups g (T = g)")
    p.add_argument("--transforms", nargs="+", default=list(TRANSFORM_ORDER), choices=TRANSFORM_ORDER)
    p.add_argument("--calib-tokens", type=int, default=8192)
    p.add_argument("--calib-seq-len", type=int, default=256)
    p.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "tpla_accuracy_cache")
    p.add_argument("--threads-per-rank", type=int, default=1)
    p.add_argument("--seed", type=int, default=0, help="picks the calibration files")
    p.add_argument("--no-write", action="store_true", help="print the table instead of writing results/")
    args = p.parse_args(argv)
    for name in (
        "samples",
        "prefix_len",
        "continuation_len",
        "calib_tokens",
        "calib_seq_len",
        "threads_per_rank",
    ):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if any(g < 2 for g in args.groups):
        raise ValueError("--groups: TPLA needs g >= 2 (g = 1, exact MLA, is always the reference row)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    start = time.perf_counter()
    set_threads(args.threads_per_rank)
    split = load_split()
    tokenizer = load_tokenizer(args.model_path)
    if args.text is not None:
        texts, text_desc = [args.text.read_text(errors="replace")], f"`{args.text.name}`"
    else:
        texts = [f.text for f in split.held_out]
        text_desc = (
            f"held-out split of the Python {platform.python_version()} standard library "
            f"({len(split.held_out)} files)"
        )
    samples = eval_samples(tokenizer, texts, args.samples, args.prefix_len + args.continuation_len)
    targets = torch.tensor([s[args.prefix_len :] for s in samples])
    logger.info("%d samples of %d + %d tokens", len(samples), args.prefix_len, args.continuation_len)

    t0 = time.perf_counter()
    ref = run_variant(Variant(), args, samples, None, check_single=True)
    ref_logp = torch.log_softmax(ref.logits.double(), dim=-1)
    results = [(Variant(), score(ref.logits, ref_logp, targets, ref.kv_bytes, time.perf_counter() - t0))]
    checks = [f"MLA {ref.single_gap:.1e}"]
    logger.info("MLA: ppl %.3f", results[0][1].ppl)

    text, n_files = calibration_text(split, 8 * args.calib_tokens, args.seed)
    calib_desc = f"{n_files} training-split files of the Python {platform.python_version()} standard library"
    calib = CalibrationStore(args, ref.fingerprint, text)
    for g in args.groups:  # calibrate first, one process at a time
        for t in args.transforms:
            calib.calibrated(g, t)

    energy_groups = max(args.groups)
    energy = {t: latent_energy(args, samples, calib, energy_groups, t) for t in args.transforms}

    checked: set[int] = set()
    total = len(args.groups) * len(args.transforms) * 5

    def evaluate(v: Variant) -> None:
        t0 = time.perf_counter()
        run = run_variant(v, args, samples, calib, check_single=v.tp not in checked)
        if run.single_gap is not None:
            checked.add(v.tp)
            checks.append(f"T={v.tp} {run.single_gap:.1e}")
        s = score(run.logits, ref_logp, targets, run.kv_bytes, time.perf_counter() - t0)
        results.append((v, s))
        logger.info(
            "[%d/%d] %s: ppl %.3f, KL %.4f, top-1 %.1f%% (%.0f s)",
            len(results) - 1,
            total,
            v.label,
            s.ppl,
            s.kl,
            100 * s.top1,
            s.seconds,
        )

    for v in grid(args.groups, args.transforms):
        evaluate(v)
    for (
        g
    ) in args.groups:  # the paper's ablation: each transform's best setting, prompt tokens through TPLA too
        for t in args.transforms:
            best = min((r for r in results if (r[0].groups, r[0].transform) == (g, t)), key=lambda r: r[1].kl)
            evaluate(replace(best[0], pd_sep=False))

    body = render(
        args,
        results,
        text_desc,
        calib_desc,
        calib.loaded,
        energy,
        energy_groups,
        checks,
        time.perf_counter() - start,
        targets.numel(),
    )
    if args.no_write:
        print(body)
    else:
        print(write_result("tpla_accuracy", "TPLA accuracy in decode mode (teacher forcing)", body))


if __name__ == "__main__":
    main()
