#!/usr/bin/env bash
# One GPU: the prefix cache's exactness tests on CUDA, then bench_prefix_cache.py at DeepSeek-V2-Lite's real
# shapes (dummy weights, bfloat16): shared-prefix, multi-turn and unshared workloads, cache on and off.
# Run from the repository root with the wheels in .whl/ (pyzmq, flashinfer-python and its dependencies). Logs and results go to $OUT.
# Budget: < 6 minutes.
set -uo pipefail
source "$(dirname "$0")/gpu_common.sh"
step pytest_gpu 150 python3 -m pytest -m gpu -q -p no:cacheprovider tests/engine/test_gpu_engine.py -k prefix_cache
step prefix_cache_gpu 300 python3 benchmarks/bench_prefix_cache.py --model-path deepseek-v2-lite \
    --load-format dummy --device cuda --dtype bfloat16 --repeats 2 --tag "$GPU"
stamp "total; exit $status"
exit $status
