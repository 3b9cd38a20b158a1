"""End-to-end decode throughput and TPOT: MLA-TP (g = 1) against TPLA (g = 2) on T GPUs, dummy weights.

    python benchmarks/bench_e2e_decode.py --model deepseek-v2-lite --tp 2 --contexts 4096,16384,32768

Each configuration runs the real engine (scheduler, sampler, TP ranks over NCCL, attention backend) for
--steps decode steps on requests whose prompt KV is taken as given: prefill is skipped and the KV pool holds
random values (a decode step's cost does not depend on what the cache holds). For each context it measures
the largest batch the KV pool holds (capped by --max-batch) and, for TPLA, also the MLA batch (equal batch).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

from tpla_serve import Engine  # noqa: E402
from tpla_serve.engine.request import RequestSpec  # noqa: E402
from tpla_serve.models.registry import builtin_config  # noqa: E402
from tpla_serve.sampling.params import SamplingParams  # noqa: E402


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure(engine: Engine, context: int, batch: int, steps: int) -> tuple[float, float]:
    """(output tokens/s, seconds per decode step) over `steps` steps of `batch` requests at `context`."""
    sched = engine.scheduler
    params = SamplingParams(max_new_tokens=steps + 4, temperature=0.0, ignore_eos=True)
    page = engine.runner.page_size
    reqs = []
    for i in range(batch):
        req = sched.new_request(RequestSpec([1] * context, params, rid=f"bench-{context}-{i}"))
        pages = sched.allocator.alloc(-(-(context + steps + 4) // page))
        assert pages is not None, "the batch does not fit the KV pool"
        sched.add_prefilled(req, pages, first_token=1)
        reqs.append(req)
    for _ in range(2):  # warm-up: kernel compilation, allocator
        sched.step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        sched.step()
    sync()
    seconds = time.perf_counter() - start
    for req in reqs:
        sched.abort(req.rid)
        sched.pop_finished(req.rid)
    return batch * steps / seconds, seconds / steps


def max_batch(engine: Engine, context: int, steps: int, cap: int) -> int:
    page = engine.runner.page_size
    per_request = -(-(context + steps + 4) // page)
    return max(0, min(cap, engine.scheduler.allocator.num_free // per_request))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deepseek-v2-lite", help="a built-in config name")
    parser.add_argument("--override", default="{}", help="JSON replacing config keys (fewer layers, ...)")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--groups", default="1,2")
    parser.add_argument("--contexts", default="4096,16384,32768")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--max-batch", type=int, default=256)
    parser.add_argument("--attention-backend", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--mem-fraction-static", type=float, default=0.85)
    parser.add_argument("--kv-cache-bytes", type=int, default=1 << 30, help="CPU runs only")
    parser.add_argument("--disable-cuda-graph", action="store_true", help="run decode steps eagerly")
    parser.add_argument("--tag", default="", help="suffix of the results file name")
    args = parser.parse_args()

    contexts = [int(c) for c in args.contexts.split(",")]
    rows: list[tuple] = []
    mla_batch: dict[int, int] = {}
    for g in (int(x) for x in args.groups.split(",")):
        engine = Engine(
            model_path=str(builtin_config(args.model)), load_format="dummy", skip_tokenizer_init=True,
            json_model_override_args=args.override, tp_size=args.tp, tpla_groups=g, dtype=args.dtype,
            device=args.device, attention_backend=args.attention_backend, max_running_requests=args.max_batch,
            mem_fraction_static=args.mem_fraction_static, kv_cache_bytes=args.kv_cache_bytes,
            disable_cuda_graph=args.disable_cuda_graph,
        )
        try:
            engine.runner.randomize_kv(0)
            for ctx in contexts:
                batches = {max_batch(engine, ctx, args.steps, args.max_batch)}
                if g > 1 and ctx in mla_batch:
                    batches.add(mla_batch[ctx])
                for batch in sorted(b for b in batches if b > 0):
                    tps, tpot = measure(engine, ctx, batch, args.steps)
                    if g == 1:
                        mla_batch[ctx] = batch
                    rows.append((g, ctx, batch, tps, tpot * 1e3, engine.runner.kv_bytes_per_token))
                    print(f"g={g} ctx={ctx:>6} B={batch:>4} {tps:10.1f} tok/s  TPOT {tpot * 1e3:8.2f} ms", flush=True)
        finally:
            engine.shutdown()

    base = {(ctx, b): tps for g, ctx, b, tps, _, _ in rows if g == 1}
    best_mla = {ctx: max(tps for g, c, _, tps, _, _ in rows if g == 1 and c == ctx) for ctx in contexts
                if any(g == 1 and c == ctx for g, c, *_ in rows)}
    lines = ["| g | context | batch | output tok/s | TPOT (ms) | KV bytes/token/rank | vs MLA same batch | vs MLA best |",
             "|---|---|---|---|---|---|---|---|"]
    for g, ctx, b, tps, tpot, kvb in rows:
        same = f"{tps / base[(ctx, b)]:.2f}x" if (ctx, b) in base else "-"
        best = f"{tps / best_mla[ctx]:.2f}x" if ctx in best_mla else "-"
        lines.append(f"| {g} | {ctx} | {b} | {tps:.1f} | {tpot:.2f} | {kvb} | {same} | {best} |")
    body = (
        f"Model: `{args.model}` dummy weights, overrides `{args.override}`, {args.dtype}, TP={args.tp}, "
        f"attention backend `{args.attention_backend}`, {args.steps} timed decode steps after 2 warm-up steps; "
        "prefill skipped (KV pool filled with random values). "
        + ("No CUDA graphs." if args.disable_cuda_graph else "Decode steps replay CUDA graphs (captured per batch bucket).")
        + "\n\n" + "\n".join(lines)
    )
    name = f"e2e_decode_{args.model}" + (f"_{args.tag}" if args.tag else "")
    print(write_result(name, f"End-to-end decode: MLA-TP vs TPLA, TP={args.tp}", body))


if __name__ == "__main__":
    main()
