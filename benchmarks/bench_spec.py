"""Speculative decoding on the decode engine: plain decoding vs `standard` vs `easyspec` drafting.

    python benchmarks/bench_spec.py [--tp-size 2] [--ks 2,4,6] [--group-sizes 2] [--device cpu]

Target and draft are the project's trained models (models/mla-tiny, models/mla-tiny-draft). Prompts are
windows of held-out files of the training corpus (the Python standard library of the interpreter running
this), tokenized with the model's tokenizer. All runs decode the same prompts greedily with EOS ignored,
so each produces the same tokens; the table reports output tokens/s over the whole batch, the acceptance
rate (accepted / proposed drafts), the mean tokens a request's block emits, and per batched step the drafting time
(bonus calibration + draft steps) and the verification time. Each configuration runs in a fresh engine
(one TP group per process), after a warm-up request.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import write_result

from tpla_serve.config import DEFAULT_MODEL_PATH

DRAFT_PATH = str(Path(DEFAULT_MODEL_PATH).parent / "mla-tiny-draft")


def held_out_prompts(tokenizer: object, n: int, prompt_len: int, seed: int = 0) -> list[list[int]]:
    from training.corpus import load_split

    files = [f for f in load_split(limit_files=400).held_out if len(f.text) > 2000]
    rng = random.Random(seed)
    prompts = []
    for i in range(n):
        text = files[i % len(files)].text
        start = rng.randrange(0, len(text) - 1500)
        prompts.append(list(tokenizer.encode(text[start : start + 1500]))[:prompt_len])
    return prompts


def run(config: dict, prompts: list[list[int]], new_tokens: int) -> dict:
    from tpla_serve import Engine

    params = {"max_new_tokens": new_tokens, "temperature": 0, "ignore_eos": True}
    with Engine(**config) as engine:
        engine.generate(input_ids=prompts[:2], sampling_params=params | {"max_new_tokens": 16})  # warm-up
        before = engine.get_server_info()
        start = time.perf_counter()
        outs = engine.generate(input_ids=prompts, sampling_params=params)
        wall = time.perf_counter() - start
        after = engine.get_server_info()
    assert all(len(o["output_ids"]) == new_tokens for o in outs)

    def delta(key: str) -> float:
        return after[key] - before[key]

    steps = delta("spec_verify_steps")
    return {
        "tokens_per_s": len(prompts) * new_tokens / wall,
        "accept_rate": delta("spec_accepted_drafts") / max(delta("spec_proposed_drafts"), 1),
        "accept_length": delta("spec_emitted_tokens") / delta("spec_verified_blocks") if steps else 1.0,
        "draft_ms": 1e3 * delta("spec_draft_seconds") / steps if steps else 0.0,
        "verify_ms": 1e3 * delta("spec_verify_seconds") / steps if steps else 0.0,
        "outputs": [o["output_ids"] for o in outs],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tp-size", type=int, default=2)
    parser.add_argument("--tpla-groups", type=int, default=1)
    parser.add_argument("--ks", default="2,4,6", help="draft tokens per step")
    parser.add_argument("--group-sizes", default="2", help="EasySpec N values (each <= tp-size)")
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--attention-backend", default="auto")
    parser.add_argument("--algorithms", default="plain,standard,easyspec", help="which decodings to run")
    parser.add_argument("--disable-cuda-graph", action="store_true", help="run plain decode steps eagerly too")
    parser.add_argument("--name", default="spec_decode", help="results file name prefix")
    args = parser.parse_args()

    from tpla_serve.engine.tokenizer import load_tokenizer

    prompts = held_out_prompts(load_tokenizer(DEFAULT_MODEL_PATH), args.num_prompts, args.prompt_len)
    base = {
        "model_path": DEFAULT_MODEL_PATH, "tp_size": args.tp_size, "tpla_groups": args.tpla_groups,
        "device": args.device, "dtype": args.dtype, "attention_backend": args.attention_backend,
        "disable_cuda_graph": args.disable_cuda_graph,
    }
    ks = [int(k) for k in args.ks.split(",")]
    group_sizes = [int(n) for n in args.group_sizes.split(",") if n]  # empty: no easyspec runs (T = 1)
    algorithms = set(args.algorithms.split(","))
    runs: list[tuple[str, int | None, int | None, dict]] = [("plain", None, None, base)] if "plain" in algorithms else []
    for k in ks:
        spec = dict(base, speculative_draft_model_path=DRAFT_PATH, speculative_num_draft_tokens=k)
        if "standard" in algorithms:
            runs.append(("standard", k, None, dict(spec, speculative_algorithm="standard")))
        for n in group_sizes if "easyspec" in algorithms else []:
            runs.append(("easyspec", k, n, dict(spec, speculative_algorithm="easyspec", easyspec_group_size=n)))

    results = []
    for name, k, n, config in runs:
        r = run(config, prompts, args.new_tokens)
        results.append((name, k, n, r))
        print(f"{name:9s} k={k} N={n}: {r['tokens_per_s']:.1f} tok/s, accept {r['accept_rate']:.3f}, "
              f"length {r['accept_length']:.2f}, draft {r['draft_ms']:.1f} ms, verify {r['verify_ms']:.1f} ms",
              flush=True)

    plain = next((r for name, _, _, r in results if name == "plain"), None)
    rows = [
        ("| decoding | k | N | output tok/s | vs plain | accept rate | tokens / block | draft ms / step | "
         "verify ms / step | draft speed-up vs standard | same tokens as plain |"),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    standard_draft = {k: r["draft_ms"] for name, k, _, r in results if name == "standard"}
    for name, k, n, r in results:
        speedup = ""
        if name == "easyspec" and k in standard_draft and r["draft_ms"]:
            speedup = f"{standard_draft[k] / r['draft_ms']:.2f}x"
        vs_plain = f"{r['tokens_per_s'] / plain['tokens_per_s']:.2f}x" if plain else "-"
        same = ("yes" if r["outputs"] == plain["outputs"] else "NO") if plain else "-"
        rows.append(
            f"| {name} | {k or ''} | {n or ''} | {r['tokens_per_s']:.1f} | {vs_plain} | "
            f"{r['accept_rate']:.3f} | {r['accept_length']:.2f} | {r['draft_ms']:.2f} | {r['verify_ms']:.2f} | "
            f"{speedup} | {same} |"
        )
    graphs = ""
    if args.device != "cpu" and torch.cuda.is_available():
        graphs = ", CUDA graphs " + ("off" if args.disable_cuda_graph else "on (plain decode steps)")
    setup = (
        f"Target models/mla-tiny (15.2M), draft models/mla-tiny-draft (3.5M, 6 layers), TP={args.tp_size}, "
        f"g={args.tpla_groups}, device {args.device}, dtype {args.dtype}, attention backend "
        f"{args.attention_backend}{graphs}; "
        f"{args.num_prompts} held-out prompts of {args.prompt_len} tokens decoded "
        f"together, {args.new_tokens} new tokens each, greedy. EasySpec groups the draft's middle layers "
        "[1..4] in groups of N (layers 0 and 5 run as usual)."
    )
    path = write_result(args.name, "Speculative decoding: plain vs standard vs EasySpec", setup + "\n\n" + "\n".join(rows))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
