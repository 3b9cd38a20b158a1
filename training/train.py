"""Train a DeepSeek-V3-architecture model from scratch on the Python standard library.

    python -m training.train --preset target --out models/mla-tiny --time-budget 240
    python -m training.train --preset draft --tokenizer models/mla-tiny --out models/mla-tiny-draft
    python -m training.train --smoke --out /tmp/smoke

Without --tokenizer a byte-level BPE is trained on the training split and saved with the model; with it,
the given tokenizer files are copied, so a draft shares its target's tokenizer exactly. Runs are
deterministic given --seed and --steps on CPU; on a GPU, attention backward kernels use atomics, so
losses agree only to rounding. --time-budget picks the step count from the measured step time instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import platform
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm
from transformers import DeepseekV3ForCausalLM, PreTrainedTokenizerBase

from training.balance import ExpertLoadBalancer
from training.config import PRESETS, ModelShape, build_config
from training.corpus import DEFAULT_HELD_OUT_FRACTION, load_split
from training.data import WindowSampler, encode_files
from training.export import ModelCard, copy_tokenizer, count_parameters, save_model, write_card
from training.metrics import evaluate_models
from training.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer

log = logging.getLogger("training.train")

SAMPLE_PROMPT = "def fibonacci(n):"
_SMOKE_DEFAULTS = {
    "preset": "smoke",
    "vocab_size": 512,
    "seq_len": 64,
    "batch_size": 4,
    "steps": 6,
    "warmup_steps": 2,
    "limit_files": 12,
    "eval_tokens": 4096,
    "device": "cpu",
    "log_every": 1,
    "sample_tokens": 8,
}
# Steps timed to size a --time-budget run: after these warm-up steps, over this many steps.
_TIMING_SKIP_STEPS = 5
_TIMING_STEPS = 20


@dataclass(frozen=True)
class RunResult:
    steps: int
    train_seconds: float
    final_train_loss: float


def _shape_overrides() -> dict[str, type]:
    return {f.name: int for f in dataclasses.fields(ModelShape)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="output directory (HF format)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="target", help="model shape preset")
    for name, kind in _shape_overrides().items():
        p.add_argument(
            f"--{name.replace('_', '-')}", type=kind, default=None, help=f"override the preset's {name}"
        )
    p.add_argument("--tokenizer", type=Path, default=None, help="reuse the tokenizer files in this directory")
    p.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size when training one")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=2000, help="optimizer steps (ignored with --time-budget)")
    p.add_argument("--time-budget", type=float, default=None, help="seconds of training; sets the step count")
    p.add_argument(
        "--max-epochs", type=float, default=None, help="cap the steps at this many passes over the data"
    )
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--bias-update-rate", type=float, default=1e-3, help="router bias step per update")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--experts-impl", choices=["grouped_mm", "eager"], default="grouped_mm")
    p.add_argument("--limit-files", type=int, default=None, help="use only the first N training files")
    p.add_argument("--held-out-fraction", type=float, default=DEFAULT_HELD_OUT_FRACTION)
    p.add_argument("--eval-batch-size", type=int, default=16)
    p.add_argument("--eval-tokens", type=int, default=None, help="score only the first N held-out tokens")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--sample-tokens", type=int, default=64, help="greedy tokens of the logged sample")
    p.add_argument("--name", default=None, help="model name in the card (default: the output folder name)")
    p.add_argument(
        "--smoke", action="store_true", help="a few steps of a tiny model on a small slice, on CPU"
    )
    return p


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = build_parser()
    known, _ = parser.parse_known_args(argv)
    if known.smoke:
        parser.set_defaults(**_SMOKE_DEFAULTS)
    args = parser.parse_args(argv)
    if args.eval_tokens is not None and args.eval_tokens < 2:
        raise ValueError(f"eval_tokens: must be >= 2, got {args.eval_tokens}")
    for name in ("seq_len", "batch_size", "steps", "warmup_steps", "log_every", "eval_batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"{name}: must be >= 1, got {getattr(args, name)}")
    if args.max_epochs is not None and args.max_epochs <= 0:
        raise ValueError(f"max_epochs: must be > 0, got {args.max_epochs}")
    if args.time_budget is not None:
        if args.time_budget <= 0:
            raise ValueError(f"time_budget: must be > 0, got {args.time_budget}")
        if args.warmup_steps < _TIMING_SKIP_STEPS + _TIMING_STEPS:
            # The step count is fixed while still warming up, so the schedule equals a --steps run's.
            raise ValueError(
                f"warmup_steps: must be >= {_TIMING_SKIP_STEPS + _TIMING_STEPS} with --time-budget"
            )
    return args


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {name} requested but CUDA is not available")
    return device


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()})"


def model_shape(args: argparse.Namespace) -> ModelShape:
    overrides = {k: getattr(args, k) for k in _shape_overrides() if getattr(args, k) is not None}
    return dataclasses.replace(PRESETS[args.preset], **overrides)


def lr_at(step: int, total: int, peak: float, warmup: int, min_ratio: float = 0.1) -> float:
    """Linear warm-up to `peak`, then cosine decay to `min_ratio * peak` at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(
    model: torch.nn.Module, lr: float, weight_decay: float, device: torch.device
) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not norms or biases)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")


class StepBudget:
    """The run's step count: fixed, or sized from the step time measured early in warm-up.

    With a time budget the count is fixed after step _TIMING_SKIP_STEPS + _TIMING_STEPS, still inside warm-up,
    so the learning-rate schedule is the one a `--steps` run of the same length follows.
    """

    def __init__(
        self,
        steps: int,
        time_budget: float | None,
        warmup_steps: int,
        cap: int,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.time_budget = time_budget
        self.warmup_steps = warmup_steps
        self.cap = cap
        self.total = min(steps, cap)
        if time_budget is not None:
            self.total = max(warmup_steps + 1, _TIMING_SKIP_STEPS + _TIMING_STEPS + 1)
        self._clock = clock
        self._start = clock()
        self._timing_start = 0.0

    def after_step(self, step: int, device: torch.device) -> bool:
        """Record that `step` steps are done; True when this fixed the step count."""
        if self.time_budget is None or step not in (_TIMING_SKIP_STEPS, _TIMING_SKIP_STEPS + _TIMING_STEPS):
            return False
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        now = self._clock()
        if step == _TIMING_SKIP_STEPS:
            self._timing_start = now
            return False
        per_step = (now - self._timing_start) / _TIMING_STEPS
        affordable = step + int((self.time_budget - (now - self._start)) / per_step)
        self.total = max(step + 1, self.warmup_steps + 1, min(self.cap, affordable))
        log.info("%.1f ms/step measured: training for %d steps", per_step * 1e3, self.total)
        return True


def train_loop(
    model: DeepseekV3ForCausalLM,
    sampler: WindowSampler,
    args: argparse.Namespace,
    device: torch.device,
    max_steps: int | None = None,
) -> RunResult:
    """Train for args.steps, or as many steps as fit args.time_budget; never more than max_steps."""
    cap = max_steps if max_steps is not None else sys.maxsize
    optimizer = make_optimizer(model, args.lr, args.weight_decay, device)
    balancer = ExpertLoadBalancer(model, args.bias_update_rate)
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    budget = StepBudget(args.steps, args.time_budget, args.warmup_steps, cap)
    model.train()
    interval_loss = torch.zeros((), device=device)
    interval_steps = 0
    last_loss = float("nan")
    start = time.perf_counter()
    step = 0
    with logging_redirect_tqdm(), tqdm(total=budget.total, desc="train", unit="step", mininterval=5.0) as bar:
        while step < budget.total:
            batch = sampler.next_batch().to(device, non_blocking=True)
            lr = lr_at(step, budget.total, args.lr, args.warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with autocast:
                logits = model(input_ids=batch[:, :-1]).logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            balancer.step()
            interval_loss += loss.detach()
            interval_steps += 1
            step += 1
            bar.update(1)
            if budget.after_step(step, device):
                bar.total = budget.total
            total = budget.total
            if step % args.log_every == 0 or step == total:
                last_loss = (interval_loss / interval_steps).item()
                elapsed = time.perf_counter() - start
                log.info(
                    "step %d/%d loss %.4f lr %.2e max/mean expert load %.2f %.0f tok/s",
                    step,
                    total,
                    last_loss,
                    lr,
                    balancer.imbalance(),
                    step * sampler.batch_size * sampler.seq_len / elapsed,
                )
                bar.set_postfix(loss=f"{last_loss:.3f}")
                interval_loss.zero_()
                interval_steps = 0
    balancer.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return RunResult(
        steps=budget.total, train_seconds=time.perf_counter() - start, final_train_loss=last_loss
    )


@torch.no_grad()
def greedy_sample(
    model: DeepseekV3ForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    new_tokens: int,
    device: torch.device,
) -> str:
    model.eval()
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def prepare_tokenizer(args: argparse.Namespace, train_texts: Sequence[str]) -> PreTrainedTokenizerBase:
    args.out.mkdir(parents=True, exist_ok=True)
    if args.tokenizer is not None:
        copy_tokenizer(args.tokenizer, args.out)
        return load_tokenizer(args.out)
    started = time.perf_counter()
    tokenizer = train_tokenizer(train_texts, args.vocab_size)
    save_tokenizer(tokenizer, args.out)
    log.info("trained a %d-entry BPE in %.1f s", len(tokenizer), time.perf_counter() - started)
    return load_tokenizer(args.out)


def run(args: argparse.Namespace) -> ModelCard:
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    split = load_split(held_out_fraction=args.held_out_fraction, limit_files=args.limit_files)
    log.info(
        "corpus %s: %d training files (%.1f MB), %d held-out files (%.2f MB)",
        split.root,
        len(split.train),
        split.train_bytes / 1e6,
        len(split.held_out),
        split.held_out_bytes / 1e6,
    )
    tokenizer = prepare_tokenizer(args, [f.text for f in split.train])
    train_stream = encode_files(tokenizer, split.train)
    held_out_stream = encode_files(tokenizer, split.held_out)[: args.eval_tokens]
    log.info(
        "%d training tokens, %d held-out tokens (%.1f s to prepare)",
        train_stream.numel(),
        held_out_stream.numel(),
        time.perf_counter() - started,
    )

    shape = model_shape(args)
    config = build_config(
        shape,
        vocab_size=len(tokenizer),
        max_position_embeddings=args.seq_len,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(args.seed)
    model = DeepseekV3ForCausalLM(config)
    model.set_experts_implementation(args.experts_impl)
    model.to(device)
    total_params, activated = count_parameters(model)
    log.info("model: %s parameters, %s activated per token", f"{total_params:,}", f"{activated:,}")

    sampler = WindowSampler(train_stream, args.seq_len, args.batch_size, seed=args.seed)
    max_steps = None
    if args.max_epochs is not None:
        max_steps = max(
            1, math.ceil(args.max_epochs * train_stream.numel() / (args.batch_size * args.seq_len))
        )
        log.info("--max-epochs %g caps training at %d steps", args.max_epochs, max_steps)
    result = train_loop(model, sampler, args, device, max_steps)
    log.info(
        "trained %d steps in %.1f s, final loss %.4f",
        result.steps,
        result.train_seconds,
        result.final_train_loss,
    )

    model.eval()
    (score,) = evaluate_models([model], held_out_stream, args.seq_len, args.eval_batch_size, device)
    log.info(
        "held-out: nll %.4f perplexity %.2f accuracy %.3f", score.mean_nll, score.perplexity, score.accuracy
    )
    completion = greedy_sample(model, tokenizer, SAMPLE_PROMPT, args.sample_tokens, device)
    log.info("greedy sample:\n%s%s", SAMPLE_PROMPT, completion)

    save_model(model, args.out)
    card = ModelCard(
        name=args.name or args.out.name,
        role={"target": "target", "target-deep": "target", "draft": "draft"}.get(args.preset, "smoke-test"),
        total_params=total_params,
        activated_params=activated,
        config_summary={
            "vocab_size": len(tokenizer),
            "max_position_embeddings": args.seq_len,
            **dataclasses.asdict(shape),
        },
        python_version=platform.python_version(),
        train_files=len(split.train),
        train_tokens=train_stream.numel(),
        held_out_files=len(split.held_out),
        held_out_tokens=score.tokens,
        held_out_fraction=args.held_out_fraction,
        steps=result.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=args.lr,
        seed=args.seed,
        device_name=device_name(device),
        train_seconds=result.train_seconds,
        final_train_loss=result.final_train_loss,
        held_out_nll=score.mean_nll,
        held_out_perplexity=score.perplexity,
        held_out_accuracy=score.accuracy,
        command=_reproduce_command(args, result.steps),
        sample_prompt=SAMPLE_PROMPT,
        sample_completion=completion,
    )
    write_card(card, args.out)
    log.info("saved %s", args.out)
    return card


def _reproduce_command(args: argparse.Namespace, steps: int) -> str:
    """The command that repeats this run with its step count fixed."""
    parts = ["python", "-m", "training.train", "--preset", args.preset, "--out", str(args.out)]
    overrides = {k: getattr(args, k) for k in _shape_overrides() if getattr(args, k) is not None}
    for key, value in overrides.items():
        parts += [f"--{key.replace('_', '-')}", str(value)]
    if args.tokenizer is not None:
        parts += ["--tokenizer", str(args.tokenizer)]
    else:
        parts += ["--vocab-size", str(args.vocab_size)]
    parts += [
        "--seq-len",
        str(args.seq_len),
        "--batch-size",
        str(args.batch_size),
        "--steps",
        str(steps),
        "--lr",
        str(args.lr),
        "--warmup-steps",
        str(args.warmup_steps),
        "--seed",
        str(args.seed),
    ]
    if args.limit_files is not None:
        parts += ["--limit-files", str(args.limit_files)]
    if args.held_out_fraction != DEFAULT_HELD_OUT_FRACTION:
        parts += ["--held-out-fraction", str(args.held_out_fraction)]
    if args.experts_impl != "grouped_mm":
        parts += ["--experts-impl", args.experts_impl]
    return shlex.join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stdout
    )
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
