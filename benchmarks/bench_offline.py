"""Offline throughput and latency: our Engine against transformers' generate on the same weights and prompts.

    python benchmarks/bench_offline.py [--model-path DIR] [--new-tokens 64] [--prompt-len 64]

Without --model-path it uses the bundled model. Both engines run greedy with EOS ignored, so they produce
the same number of tokens; batch 1 runs the prompts one after another, batch 16 all at once.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

from tpla_serve.config import DEFAULT_MODEL_PATH  # noqa: E402


def run_ours(model_path: str, prompts: list[list[int]], new_tokens: int, batch: int) -> float:
    from tpla_serve import Engine

    engine = Engine(model_path=model_path, dtype="float32", device="cpu")
    params = {"max_new_tokens": new_tokens, "temperature": 0, "ignore_eos": True}
    engine.generate(input_ids=prompts[0], sampling_params=params | {"max_new_tokens": 2})  # warm-up
    start = time.perf_counter()
    for i in range(0, len(prompts), batch):
        outs = engine.generate(input_ids=prompts[i : i + batch], sampling_params=params)
        assert all(len(o["output_ids"]) == new_tokens for o in outs)
    return time.perf_counter() - start


def run_hf(model_path: str, prompts: list[list[int]], new_tokens: int, batch: int) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(prompts), batch):
            chunk = prompts[i : i + batch]
            width = max(len(p) for p in chunk)
            ids = torch.tensor([[0] * (width - len(p)) + p for p in chunk])  # left padding
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
            out = model.generate(
                ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                do_sample=False, pad_token_id=0,
            )
            assert out.shape[1] == width + new_tokens
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-path", default=DEFAULT_MODEL_PATH)
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()

    import json

    vocab = json.loads((Path(args.model_path) / "config.json").read_text())["vocab_size"]
    rng = random.Random(0)
    prompts = [
        [rng.randrange(2, vocab) for _ in range(rng.randrange(args.prompt_len // 2, args.prompt_len + 1))]
        for _ in range(args.num_prompts)
    ]
    total = args.num_prompts * args.new_tokens
    rows = []
    for batch in (1, 16):
        for name, fn in (("tpla-serve Engine", run_ours), ("transformers generate", run_hf)):
            seconds = fn(args.model_path, prompts, args.new_tokens, batch)
            per_batch = seconds / -(-args.num_prompts // batch)
            rows.append((batch, name, total / seconds, per_batch))
            print(f"batch {batch:>2} {name:<22} {total / seconds:8.1f} tok/s  {per_batch:.2f} s/batch", flush=True)
    table = "| batch | engine | output tokens/s | latency per batch (s) |\n|---|---|---|---|\n" + "\n".join(
        f"| {b} | {n} | {tps:.1f} | {lat:.2f} |" for b, n, tps, lat in rows
    )
    body = (
        f"Model: `{Path(args.model_path).name}`, fp32, greedy, {args.num_prompts} prompts of "
        f"{args.prompt_len // 2}-{args.prompt_len} tokens, {args.new_tokens} new tokens each (EOS ignored).\n\n"
        + table
    )
    print(write_result("offline_throughput", "Offline throughput: tpla-serve Engine vs transformers", body))


if __name__ == "__main__":
    main()
