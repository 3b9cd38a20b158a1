"""Decode TPOT against the GPU's busy time per step: how much of a step the host still costs.

    python benchmarks/bench_decode_busy.py --contexts 4096,32768 --batch 256

The real engine (scheduler, sampler, CUDA graphs, the request table) decodes --steps steps of requests whose
prompt KV is taken as given (prefill skipped, random KV), as bench_e2e_decode.py does. TPOT is the step's
wall time. The GPU's busy time per step is the sum of the device's kernel and copy times over the same
kind of steps, read with the torch profiler (CUPTI); TPOT / busy is then 1.0 when the host never makes the
device wait. Each configuration runs with overlap scheduling on and off.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_e2e_decode import measure  # noqa: E402
from common import write_result  # noqa: E402

from tpla_serve import Engine  # noqa: E402
from tpla_serve.models.registry import builtin_config  # noqa: E402


def busy_ms(engine: Engine, context: int, batch: int, steps: int) -> float:
    """Device time per decode step: kernels and copies the profiler saw, divided by the steps."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        measure(engine, context, batch, steps)
    device_us = sum(e.self_device_time_total for e in prof.key_averages())
    # measure() also runs its 2 warm-up steps and sets up requests: count their device time as steps too
    return device_us / 1e3 / (steps + 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deepseek-v3")
    parser.add_argument("--override", default='{"num_hidden_layers": 4, "first_k_dense_replace": 4}')
    parser.add_argument("--contexts", default="4096,32768")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--attention-backend", default="triton")
    parser.add_argument("--context-length", type=int, default=40960, help="fewer page-table widths to capture")
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    rows = []
    for overlap in (True, False):
        engine = Engine(
            model_path=str(builtin_config(args.model)), load_format="dummy", skip_tokenizer_init=True,
            json_model_override_args=args.override, dtype="bfloat16", attention_backend=args.attention_backend,
            max_running_requests=args.batch, disable_overlap_schedule=not overlap,
            context_length=args.context_length,
        )
        try:
            engine.runner.randomize_kv(0)
            for ctx in (int(c) for c in args.contexts.split(",")):
                measure(engine, ctx, args.batch, 2)  # warm-up
                _, tpot = measure(engine, ctx, args.batch, args.steps)
                busy = busy_ms(engine, ctx, args.batch, args.steps)
                rows.append((overlap, ctx, tpot * 1e3, busy))
                print(f"overlap={overlap} ctx={ctx} TPOT {tpot * 1e3:.2f} ms busy {busy:.2f} ms "
                      f"ratio {tpot * 1e3 / busy:.3f}", flush=True)
        finally:
            engine.shutdown()
            time.sleep(1)
    lines = ["| overlap schedule | context | TPOT ms | GPU busy ms/step | TPOT / busy |", "|---|---|---|---|---|"]
    for overlap, ctx, tpot, busy in rows:
        lines.append(f"| {'on' if overlap else 'off'} | {ctx} | {tpot:.2f} | {busy:.2f} | {tpot / busy:.3f} |")
    body = "\n".join([
        f"Model `{args.model}` dummy weights, overrides `{args.override}`, bf16, TP=1, batch {args.batch}, "
        f"attention backend `{args.attention_backend}`, CUDA graphs, {args.steps} timed steps. "
        + __doc__.split("\n\n")[2].replace("\n", " "),
        "",
        *lines,
    ])
    name = "decode_busy" + (f"_{args.tag}" if args.tag else "")
    print(write_result(name, "Decode TPOT against GPU busy time", body))


if __name__ == "__main__":
    main()
