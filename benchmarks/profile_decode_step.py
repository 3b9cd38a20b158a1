"""Where rank 0's host time goes in decode steps: cProfile over timed steps of the real engine.

    python benchmarks/profile_decode_step.py --model deepseek-v3 \
        --override '{"num_hidden_layers": 4, "first_k_dense_replace": 4}' --tp 2 --groups 2 --context 32768 --batch 256

Requests are set up as in bench_e2e_decode.py (prefill skipped, random KV). The step time is printed without
and with the profiler; the tables list rank 0's functions by own time and by cumulative time. With CUDA graphs
the wait for the GPU shows up in the sampler's `tolist`, so host overhead is the rest of the step.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_e2e_decode import measure  # noqa: E402

from tpla_serve import Engine  # noqa: E402
from tpla_serve.models.registry import builtin_config  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deepseek-v3", help="a built-in config name")
    parser.add_argument("--override", default='{"num_hidden_layers": 4, "first_k_dense_replace": 4}')
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--groups", type=int, default=2)
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--attention-backend", default="triton")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--top", type=int, default=25, help="rows per table")
    args = parser.parse_args()
    engine = Engine(
        model_path=str(builtin_config(args.model)), load_format="dummy", skip_tokenizer_init=True,
        json_model_override_args=args.override, tp_size=args.tp, tpla_groups=args.groups, dtype=args.dtype,
        attention_backend=args.attention_backend, max_running_requests=args.batch,
    )
    try:
        engine.runner.randomize_kv(0)
        measure(engine, args.context, args.batch, 2)
        _, tpot = measure(engine, args.context, args.batch, args.steps)
        print(f"TPOT without the profiler: {tpot * 1e3:.2f} ms", flush=True)
        profiler = cProfile.Profile()
        profiler.enable()
        _, tpot = measure(engine, args.context, args.batch, args.steps)
        profiler.disable()
        print(f"TPOT with the profiler: {tpot * 1e3:.2f} ms (the tables include request setup)", flush=True)
        stats = pstats.Stats(profiler)
        stats.sort_stats("tottime").print_stats(args.top)
        stats.sort_stats("cumtime").print_stats(args.top)
    finally:
        engine.shutdown()


if __name__ == "__main__":
    main()
