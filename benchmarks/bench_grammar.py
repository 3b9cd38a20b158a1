"""What constrained decoding costs: offline tokens/s with and without a grammar, and its host work per token.

    python benchmarks/bench_grammar.py [--model-path DIR] [--new-tokens 64] [--num-prompts 16] [--device cuda]

Throughput: the bundled model, greedy, every request producing exactly --new-tokens tokens (a regex that
never ends, EOS held back by min_new_tokens), at batch 1 and 16, overlap scheduling on and off; runs
with and without the grammar alternate on one engine, and the best of --repeats counts (the machine may
be shared). Host
work: a matcher's bitmask fill and accept per token, the bitmask applied to [B, V] logits, and grammar
compilation (uncached and cached), on the model's 4,096-token vocabulary and on a synthetic 129,280-token
one (DeepSeek-V3's size; random byte strings, so only the sizes are realistic).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
import xgrammar as xgr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

from tpla_serve.config import DEFAULT_MODEL_PATH  # noqa: E402
from tpla_serve.grammar.matcher import RequestGrammar, grammar_bitmask  # noqa: E402

REGEX = r"[a-zA-Z0-9_ .,:()\n]*"
SCHEMA = json.dumps(
    {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "age": {"type": "integer"},
            "tags": {"type": "array", "items": {"type": "string"}},
        },
        "required": ["name", "age", "tags"],
    }
)


def throughput(engine, prompts: list[list[int]], new_tokens: int, batch: int, grammar: bool) -> float:
    params = {
        "max_new_tokens": new_tokens,
        "min_new_tokens": new_tokens,
        "temperature": 0,
        "ignore_eos": True,
    }
    if grammar:
        params["regex"] = REGEX
    engine.generate(input_ids=prompts[0], sampling_params=params | {"max_new_tokens": 2, "min_new_tokens": 2})
    start = time.perf_counter()
    for i in range(0, len(prompts), batch):
        outs = engine.generate(input_ids=prompts[i : i + batch], sampling_params=params)
        assert all(len(o["output_ids"]) == new_tokens for o in outs), [o["meta_info"] for o in outs]
    return len(prompts) * new_tokens / (time.perf_counter() - start)


def synthetic_info(vocab: int) -> xgr.TokenizerInfo:
    rng = random.Random(0)
    alphabet = [bytes([c]) for c in range(32, 127)] + [b"\n"]
    pieces = [b"".join(rng.choice(alphabet) for _ in range(rng.randint(1, 8))) for _ in range(vocab - 258)]
    vocab_bytes = [bytes([b]) for b in range(256)] + pieces + [b"<s>", b"</s>"]
    return xgr.TokenizerInfo(vocab_bytes, xgr.VocabType.RAW, vocab_size=vocab, stop_token_ids=[vocab - 1])


def host_costs(info: xgr.TokenizerInfo, label: str, rows: list[str], steps: int = 200) -> None:
    vocab = info.vocab_size
    compiler = xgr.GrammarCompiler(info, cache_enabled=False)
    for kind in ("regex", "json_schema"):
        start = time.perf_counter()
        compiled = compiler.compile_regex(REGEX) if kind == "regex" else compiler.compile_json_schema(SCHEMA)
        compile_ms = (time.perf_counter() - start) * 1e3
        grammar = RequestGrammar(xgr.GrammarMatcher(compiled), kind)
        fill = accept = 0.0
        rng = random.Random(1)
        for step in range(1, steps + 1):
            t0 = time.perf_counter()
            mask = grammar_bitmask([grammar], vocab, torch.device("cpu"))
            t1 = time.perf_counter()
            assert mask is not None
            allowed = torch.nonzero(mask.allowed(vocab)[0]).flatten().tolist()
            choices = [t for t in allowed if t != vocab - 1] or allowed
            t2 = time.perf_counter()
            assert grammar.accept(rng.choice(choices))
            accept += time.perf_counter() - t2
            fill += t1 - t0
            if grammar.terminated:
                break
        rows.append(
            f"| {label} | {vocab} | {kind} | {compile_ms:.1f} | {fill / step * 1e6:.0f} | "
            f"{accept / step * 1e6:.0f} |"
        )
        print(rows[-1], flush=True)


def apply_cost(vocab: int, batch: int, device: torch.device) -> float:
    """ms to mask [batch, vocab] fp32 logits with a bitmask over every row (best of 10)."""
    from tpla_serve.sampling.bitmask import TokenBitmask

    logits = torch.randn(batch, vocab, device=device)
    bits = torch.randint(-(2**31), 2**31 - 1, (batch, -(-vocab // 32)), dtype=torch.int32)
    mask = TokenBitmask.to_device(list(range(batch)), bits, device)
    best = float("inf")
    for _ in range(10):
        target = logits.clone()
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        mask.apply(target)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-path", default=DEFAULT_MODEL_PATH)
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    from tpla_serve import Engine

    config = json.loads((Path(args.model_path) / "config.json").read_text())
    rng = random.Random(0)
    prompts = [
        [
            rng.randrange(2, config["vocab_size"])
            for _ in range(rng.randrange(args.prompt_len // 2, args.prompt_len + 1))
        ]
        for _ in range(args.num_prompts)
    ]
    tput = ["| batch | overlap | unconstrained tok/s | regex tok/s | ratio |", "|---|---|---|---|---|"]
    for overlap in (True, False):
        plain = {"disable_overlap_schedule": not overlap}
        with Engine(model_path=args.model_path, dtype="float32", device=args.device, **plain) as engine:
            for batch in (1, 16):
                runs = [
                    (
                        throughput(engine, prompts, args.new_tokens, batch, False),
                        throughput(engine, prompts, args.new_tokens, batch, True),
                    )
                    for _ in range(args.repeats)
                ]
                free, constrained = max(r[0] for r in runs), max(r[1] for r in runs)
                tput.append(
                    f"| {batch} | {'on' if overlap else 'off'} | {free:.1f} | {constrained:.1f} | "
                    f"{constrained / free:.3f} |"
                )
                print(tput[-1], flush=True)

    from tpla_serve.engine.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.model_path)
    host = [
        "| vocabulary | size | grammar | compile ms | bitmask fill µs/token | accept µs/token |",
        "|---|---|---|---|---|---|",
    ]
    host_costs(
        xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=config["vocab_size"], stop_token_ids=[1]),
        "mla-tiny",
        host,
    )
    host_costs(synthetic_info(129280), "synthetic", host)
    apply = ["| batch | vocabulary | apply ms |", "|---|---|---|"]
    for batch, vocab in ((16, 4096), (16, 129280), (256, 129280)):
        apply.append(f"| {batch} | {vocab} | {apply_cost(vocab, batch, device):.3f} |")
        print(apply[-1], flush=True)

    body = (
        f"Model: `{Path(args.model_path).name}`, fp32, greedy, {args.num_prompts} prompts of "
        f"{args.prompt_len // 2}-{args.prompt_len} tokens, {args.new_tokens} new tokens each; the "
        f"constrained requests carry the regex `{REGEX}` (it never ends; min_new_tokens holds EOS back, so "
        "both runs emit the same number of tokens). The machine is shared: ratios are the figure to read.\n\n"
        + "\n".join(tput)
        + "\n\nHost work per constrained request and token (a matcher walking random allowed tokens, 200 "
        "steps at most), and grammar compilation without the cache (a cached grammar is a dict lookup):\n\n"
        + "\n".join(host)
        + f"\n\nThe bitmask applied to fp32 logits on {args.device} (torch: unpack the bits, masked_fill), "
        "every row constrained:\n\n" + "\n".join(apply)
    )
    name = "grammar" if device.type == "cpu" else f"grammar_{device.type}"
    print(write_result(name, "Constrained decoding: throughput and host cost", body))


if __name__ == "__main__":
    main()
