"""Held-out evaluation of a target and its draft: perplexity, accuracy, and greedy agreement.

    python -m training.evaluate --target models/mla-tiny --draft models/mla-tiny-draft

Both models are scored on the held-out split of the running interpreter's standard library, tokenized with
the target's tokenizer. The draft's greedy agreement with the target (same true prefix, same argmax) is a
proxy for greedy speculative acceptance. Writes a dated markdown table to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import platform
import re
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, DeepseekV3ForCausalLM

from training.corpus import DEFAULT_HELD_OUT_FRACTION, load_split
from training.data import encode_files
from training.export import count_parameters
from training.metrics import Score, evaluate_models
from training.tokenizer import load_tokenizer
from training.train import SAMPLE_PROMPT, greedy_sample, resolve_device

log = logging.getLogger("training.evaluate")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--target", type=Path, default=Path("models/mla-tiny"))
    p.add_argument("--draft", type=Path, default=Path("models/mla-tiny-draft"))
    p.add_argument("--seq-len", type=int, default=None, help="window length (default: the models' context)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=None, help="score only the first N held-out tokens")
    p.add_argument("--held-out-fraction", type=float, default=DEFAULT_HELD_OUT_FRACTION)
    p.add_argument("--device", default="auto")
    p.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    return p


def machine_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        match = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.MULTILINE)
        if match:
            return f"CPU {match.group(1).strip()}"
    return f"CPU {platform.processor() or platform.machine()}"


def load_model(path: Path, device: torch.device) -> DeepseekV3ForCausalLM:
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    if not isinstance(model, DeepseekV3ForCausalLM):
        raise TypeError(f"{path}: expected a DeepseekV3ForCausalLM, got {type(model).__name__}")
    return model.to(device).eval()


def render_table(
    names: Sequence[str],
    models: Sequence[DeepseekV3ForCausalLM],
    scores: Sequence[Score],
    machine: str,
    held_out_files: int,
    seq_len: int,
    seconds: float,
    sample: str,
    command: str,
) -> str:
    today = dt.date.today().isoformat()
    rows = []
    for name, model, score in zip(names, models, scores):
        total, activated = count_parameters(model)
        rows.append(
            f"| {name} | {total / 1e6:.2f}M / {activated / 1e6:.2f}M | {score.mean_nll:.4f} | "
            f"{score.perplexity:.2f} | {score.accuracy:.1%} | {score.agreement:.1%} |"
        )
    body = "\n".join(rows)
    return f"""# Trained models: held-out evaluation ({today})

- Machine: {machine}; torch {torch.__version__}, transformers {transformers.__version__}.
- Held-out data: {held_out_files} files of the Python {platform.python_version()} standard library,
  {scores[0].tokens:,} scored tokens, non-overlapping windows of {seq_len} tokens, weights bf16 computed in fp32.
- Greedy agreement: fraction of positions where the model's argmax equals the target's, both given the same
  true prefix (a proxy for greedy speculative acceptance).
- Evaluation took {seconds:.1f} s.

| model | params (total / activated) | mean NLL | perplexity | next-token accuracy | greedy agreement with target |
|---|---|---|---|---|---|
{body}

Target's greedy continuation of `{SAMPLE_PROMPT}` (48 tokens):

```python
{SAMPLE_PROMPT}{sample}
```

Command: `{command}`
"""


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stdout
    )
    args = build_parser().parse_args(argv)
    if args.batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {args.batch_size}")
    if args.max_tokens is not None and args.max_tokens < 2:
        raise ValueError(f"max_tokens: must be >= 2, got {args.max_tokens}")
    device = resolve_device(args.device)
    tokenizer = load_tokenizer(args.target)
    draft_tokenizer = load_tokenizer(args.draft)
    if draft_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ValueError(f"draft: {args.draft} does not share the target's tokenizer")
    target, draft = load_model(args.target, device), load_model(args.draft, device)
    seq_len = args.seq_len or min(target.config.max_position_embeddings, draft.config.max_position_embeddings)

    split = load_split(held_out_fraction=args.held_out_fraction)
    stream = encode_files(tokenizer, split.held_out)
    if args.max_tokens is not None:
        stream = stream[: args.max_tokens]
    log.info("%d held-out files, %d tokens, windows of %d", len(split.held_out), stream.numel(), seq_len)

    started = time.perf_counter()
    scores = evaluate_models([target, draft], stream, seq_len, args.batch_size, device)
    seconds = time.perf_counter() - started
    for name, score in zip(("target", "draft"), scores):
        log.info(
            "%s: nll %.4f perplexity %.2f accuracy %.3f agreement %.3f",
            name,
            score.mean_nll,
            score.perplexity,
            score.accuracy,
            score.agreement,
        )
    sample = greedy_sample(target, tokenizer, SAMPLE_PROMPT, 48, device)
    log.info("target greedy sample:\n%s%s", SAMPLE_PROMPT, sample)

    machine = machine_name(device)
    table = render_table(
        [args.target.name, args.draft.name],
        [target, draft],
        scores,
        machine,
        len(split.held_out),
        seq_len,
        seconds,
        sample,
        shlex.join(["python", "-m", "training.evaluate", *(argv if argv is not None else sys.argv[1:])]),
    )
    slug = re.sub(r"[^a-z0-9]+", "-", machine.lower()).strip("-")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / f"models_{dt.date.today().isoformat()}_{slug}.md"
    out.write_text(table, encoding="utf-8")
    log.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
