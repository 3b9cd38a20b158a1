"""What a speculative block's forwards cost against a plain decode step, one request, one device.

    python benchmarks/bench_spec_costs.py [--target models/mla-tiny] [--draft models/mla-tiny-draft]
        [--device cpu] [--threads 1] [--ks 2,3,4] [--group-sizes 2,4] [--dummy-target] [--override JSON]

Medians of repeated forwards at a 200-token context: the target's decode step (from the request table, as
plain decoding runs it), its verification over k + 1 tokens, and the draft's decode step, sequential and
in EasySpec's layer groups batched on one device, and its calibration over 1 and 2 tokens. On CPU the times
are the process's CPU time (robust to other load on the machine); on GPU, wall time after a synchronize.
From them, the bound on speculation's speed-up at acceptance rate a and k drafts, with nothing but the
forwards counted: E(a, k) / ((k - 1) * draft step + calibration + verification) * target step, with
E = (1 - a^(k+1)) / (1 - a) tokens per block. --dummy-target gives the target random weights and --override
changes its config (a deeper target's cost without its checkpoint, e.g. training's target-deep preset).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import shown_path, write_result

from tpla_serve.config import DEFAULT_MODEL_PATH, EngineConfig

DRAFT_PATH = str(Path(DEFAULT_MODEL_PATH).parent / "mla-tiny-draft")
CONTEXT = 200


def median_ms(fn, device: torch.device, repeats: int = 30) -> float:
    cuda = device.type == "cuda"
    clock = time.perf_counter if cuda else time.process_time
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize(device)
        start = clock()
        fn()
        if cuda:
            torch.cuda.synchronize(device)
        times.append(clock() - start)
    return 1e3 * float(np.median(times))


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--target", default=DEFAULT_MODEL_PATH)
    parser.add_argument("--draft", default=DRAFT_PATH)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--ks", default="2,3,4")
    parser.add_argument("--group-sizes", default="2,4")
    parser.add_argument("--dummy-target", action="store_true")
    parser.add_argument("--override", default="{}", help="JSON overrides of the target's config")
    parser.add_argument("--name", default="spec_costs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from tpla_serve.engine.model_runner import ModelRunner
    from tpla_serve.forward_batch import BatchEntry, ForwardMode
    from tpla_serve.speculative.draft import DraftModel

    ks = [int(k) for k in args.ks.split(",")]
    # One request at a short context: a small pool (the draft's mirrors the target's pages).
    common = {"device": args.device, "dtype": args.dtype, "disable_cuda_graph": True, "max_total_tokens": 8192}
    load_format = "dummy" if args.dummy_target else "auto"
    target_cfg = EngineConfig(
        model_path=args.target, load_format=load_format, json_model_override_args=args.override, **common
    )
    runner = ModelRunner(target_cfg)
    device = runner.device
    pages = runner.allocator.alloc(-(-(CONTEXT + max(ks) + 2) // runner.page_size))
    slot = runner.table.acquire()
    runner.table.set_pages(slot, 0, pages)
    runner.table.apply(runner.table.take_delta())
    slots, positions = np.array([slot]), np.array([CONTEXT])
    rows = [("target decode step", median_ms(lambda: runner.decode(slots, positions), device))]
    for k in ks:
        entry = [BatchEntry([5] * (k + 1), CONTEXT, pages, logits_for_all=True)]
        verify = median_ms(lambda: runner.forward(ForwardMode.DECODE, entry), device)
        rows.append((f"target verification, k = {k}", verify))

    def draft_model(algorithm: str, n: int | None) -> DraftModel:
        cfg = EngineConfig(model_path=args.target, speculative_algorithm=algorithm,
                           speculative_draft_model_path=args.draft, easyspec_group_size=n, **common)
        return DraftModel(cfg, runner.model_config.vocab_size, runner.num_pages, runner.layout, device)

    token = torch.tensor([5], device=device)
    draft = draft_model("standard", None)
    rows.append(("draft decode step, sequential",
                 median_ms(lambda: draft.decode_from_table(runner.table, slots, positions, token), device)))
    for q in (1, 2):
        entry = [BatchEntry([5] * q, CONTEXT, pages)]
        rows.append((f"draft calibration, {q} token(s)",
                     median_ms(lambda: draft.forward_local(ForwardMode.DECODE, entry, exact=True), device)))
    for n in [int(n) for n in args.group_sizes.split(",") if n]:
        grouped = draft_model("easyspec", n)
        ms = median_ms(lambda: grouped.decode_from_table(runner.table, slots, positions, token), device)
        rows.append((f"draft decode step, EasySpec N = {n} ({len(grouped.groups)} groups)", ms))

    costs = dict(rows)
    step = costs["target decode step"]
    table = ["| forward | ms | / target decode step |", "|---|---|---|"]
    table += [f"| {name} | {ms:.2f} | {ms / step:.2f} |" for name, ms in rows]
    bound = [
        "| k | acceptance a | tokens / block E | bound: standard | bound: EasySpec N = 4 |",
        "|---|---|---|---|---|",
    ]
    grouped_key = next((name for name in costs if "N = 4" in name), None)
    for k in ks:
        for a in (0.6, 0.7, 0.8):
            e = (1 - a ** (k + 1)) / (1 - a)
            fixed = costs["draft calibration, 1 token(s)"] + costs[f"target verification, k = {k}"]
            std = e * step / ((k - 1) * costs["draft decode step, sequential"] + fixed)
            es = e * step / ((k - 1) * costs[grouped_key] + fixed) if grouped_key else float("nan")
            bound.append(f"| {k} | {a:.1f} | {e:.2f} | {std:.2f}x | {es:.2f}x |")
    clock = "process CPU time" if device.type == "cpu" else "wall time"
    setup = (
        f"Target {shown_path(args.target)}{' (random weights)' if args.dummy_target else ''}"
        f"{'' if args.override == '{}' else ' with ' + args.override}, draft "
        f"{shown_path(args.draft)}, device "
        f"{args.device}, dtype {args.dtype}, {torch.get_num_threads()} torch threads; one request at a "
        f"{CONTEXT}-token context; medians of 30 forwards ({clock}), eager."
    )
    body = "\n\n".join([setup, "\n".join(table), "Speed-up bound from the forwards alone:", "\n".join(bound)])
    print(body)
    print(f"wrote {write_result(args.name, 'Speculative decoding: the cost of a block', body)}")


if __name__ == "__main__":
    main()
