"""Speculative decoding on the decode engine: plain decoding vs `standard` vs `easyspec` drafting.

    python benchmarks/bench_spec.py [--tp-size 1] [--batch-size 1] [--ks 2,3,4] [--group-sizes 2,4]
        [--device cpu] [--threads 1] [--rounds 3] [--target models/mla-tiny] [--draft models/mla-tiny-draft]

Target and draft default to the project's trained models (models/mla-tiny, models/mla-tiny-draft). Prompts
are windows of held-out files of the training corpus (the Python standard library of the interpreter running
this), tokenized with the model's tokenizer, decoded --batch-size at a time. All runs decode the same
prompts greedily with EOS ignored; the table reports output tokens/s, the acceptance rate (accepted /
proposed drafts), the mean tokens a request's block emits, per block (one batched speculative step) the
drafting time (bonus calibration + draft steps) and the verification time, and whether the tokens equal
plain decoding's. Each configuration runs in a fresh engine (one TP group per process) after a warm-up
request; with --rounds R the configurations run R times in turn (plain, standard, EasySpec, plain, ...) and
the table shows each one's median throughput (min-max beside it). EasySpec's N = --easyspec-group-size:
one attention sublayer per rank with --tp-size N, batched on one device with --tp-size 1.
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
from common import shown_path, write_result

from tpla_serve.config import DEFAULT_MODEL_PATH

DRAFT_PATH = str(Path(DEFAULT_MODEL_PATH).parent / "mla-tiny-draft")


def load_average() -> str:
    try:
        return " / ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


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


def run(config: dict, prompts: list[list[int]], new_tokens: int, batch_size: int) -> dict:
    from tpla_serve import Engine

    params = {"max_new_tokens": new_tokens, "temperature": 0, "ignore_eos": True}
    with Engine(**config) as engine:
        # Warm-up at the measured batch size, long enough for every block shape (calibrations of 1..k+1
        # tokens): kernels compile per shape on first use, and that must not land in the timed run.
        engine.generate(input_ids=prompts[:batch_size], sampling_params=params | {"max_new_tokens": 48})
        before = engine.get_server_info()
        outs = []
        start = time.perf_counter()
        for i in range(0, len(prompts), batch_size):
            outs += engine.generate(input_ids=prompts[i : i + batch_size], sampling_params=params)
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


def merge_rounds(rounds: list[dict]) -> dict:
    """One configuration's rounds: median throughput (and its range), block metrics of the median round."""
    ranked = sorted(rounds, key=lambda r: r["tokens_per_s"])
    median = dict(ranked[len(ranked) // 2])
    median["range"] = (ranked[0]["tokens_per_s"], ranked[-1]["tokens_per_s"])
    median["same_outputs"] = all(r["outputs"] == rounds[0]["outputs"] for r in rounds)
    return median


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tp-size", type=int, default=1)
    parser.add_argument("--tpla-groups", type=int, default=1)
    parser.add_argument("--ks", default="2,3,4", help="draft tokens per step")
    parser.add_argument("--group-sizes", default="2,4", help="EasySpec N values (each <= tp-size when > 1)")
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=1, help="prompts decoded together")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=1, help="times every configuration runs, in turn")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (TP=1 on CPU)")
    parser.add_argument("--target", default=DEFAULT_MODEL_PATH)
    parser.add_argument("--draft", default=DRAFT_PATH)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--attention-backend", default="auto")
    parser.add_argument("--algorithms", default="plain,standard,easyspec", help="which decodings to run")
    parser.add_argument("--disable-cuda-graph", action="store_true", help="run every step eagerly")
    parser.add_argument("--cuda-graph-max-bs", type=int, default=None, help="largest captured batch bucket")
    parser.add_argument("--name", default="spec_decode", help="results file name prefix")
    args = parser.parse_args()

    from tpla_serve.engine.tokenizer import load_tokenizer

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    prompts = held_out_prompts(load_tokenizer(args.target), args.num_prompts, args.prompt_len)
    base = {
        "model_path": args.target, "tp_size": args.tp_size, "tpla_groups": args.tpla_groups,
        "device": args.device, "dtype": args.dtype, "attention_backend": args.attention_backend,
        "disable_cuda_graph": args.disable_cuda_graph,
    }
    if args.cuda_graph_max_bs is not None:
        base["cuda_graph_max_bs"] = args.cuda_graph_max_bs
    ks = [int(k) for k in args.ks.split(",")]
    group_sizes = [int(n) for n in args.group_sizes.split(",") if n]  # empty: no easyspec runs (T = 1)
    algorithms = set(args.algorithms.split(","))
    runs: list[tuple[str, int | None, int | None, dict]] = [("plain", None, None, base)] if "plain" in algorithms else []
    for k in ks:
        spec = dict(base, speculative_draft_model_path=args.draft, speculative_num_draft_tokens=k)
        if "standard" in algorithms:
            runs.append(("standard", k, None, dict(spec, speculative_algorithm="standard")))
        for n in group_sizes if "easyspec" in algorithms else []:
            easyspec = dict(spec, speculative_algorithm="easyspec", easyspec_group_size=n)
            runs.append(("easyspec", k, n, easyspec))

    load_before = load_average()
    rounds: list[list[dict]] = [[] for _ in runs]
    for _ in range(args.rounds):
        for (name, k, n, config), done in zip(runs, rounds):
            r = run(config, prompts, args.new_tokens, args.batch_size)
            done.append(r)
            print(f"{name:9s} k={k} N={n}: {r['tokens_per_s']:.1f} tok/s, accept {r['accept_rate']:.3f}, "
                  f"length {r['accept_length']:.2f}, draft {r['draft_ms']:.1f} ms, "
                  f"verify {r['verify_ms']:.1f} ms",
                  flush=True)
    results = [(name, k, n, merge_rounds(done)) for (name, k, n, _), done in zip(runs, rounds)]

    plain = next((r for name, _, _, r in results if name == "plain"), None)
    rows = [
        ("| decoding | k | N | output tok/s (min-max) | vs plain | accept rate | tokens / block | "
         "draft ms / block | verify ms / block | draft speed-up vs standard | same tokens as plain |"),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    standard_draft = {k: r["draft_ms"] for name, k, _, r in results if name == "standard"}
    for name, k, n, r in results:
        speedup = ""
        if name == "easyspec" and k in standard_draft and r["draft_ms"]:
            speedup = f"{standard_draft[k] / r['draft_ms']:.2f}x"
        vs_plain = f"{r['tokens_per_s'] / plain['tokens_per_s']:.2f}x" if plain else "-"
        same = ("yes" if r["outputs"] == plain["outputs"] else "NO") if plain else "-"
        lo, hi = r["range"]
        rows.append(
            f"| {name} | {k or ''} | {n or ''} | {r['tokens_per_s']:.1f} ({lo:.1f}-{hi:.1f}) | {vs_plain} | "
            f"{r['accept_rate']:.3f} | {r['accept_length']:.2f} | {r['draft_ms']:.2f} | "
            f"{r['verify_ms']:.2f} | "
            f"{speedup} | {same} |"
        )
    graphs = ""
    if args.device != "cpu" and torch.cuda.is_available():
        graphs = ", CUDA graphs " + ("off" if args.disable_cuda_graph else "on")
    threads = f", {torch.get_num_threads()} torch threads" if args.device == "cpu" else ""
    setup = (
        f"Target {shown_path(args.target)}, draft {shown_path(args.draft)}, TP={args.tp_size}, g={args.tpla_groups}, "
        f"device {args.device}, dtype {args.dtype}, attention backend {args.attention_backend}"
        f"{graphs}{threads}; "
        f"{args.num_prompts} held-out prompts of {args.prompt_len} tokens, decoded {args.batch_size} at a "
        f"time, {args.new_tokens} new tokens each, greedy; {args.rounds} round(s), configurations in turn. "
        "EasySpec groups the draft's middle layers in groups of N (its first and last layers run as usual): "
        "one sublayer per rank across ranks, one batched call on one device. "
        f"Load average (1/5/15 min) before: {load_before}, after: {load_average()}."
    )
    title = "Speculative decoding: plain vs standard vs EasySpec"
    path = write_result(args.name, title, setup + "\n\n" + "\n".join(rows))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
