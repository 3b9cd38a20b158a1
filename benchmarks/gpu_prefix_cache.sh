#!/usr/bin/env bash
# One GPU: the prefix cache's exactness tests on CUDA, then bench_prefix_cache.py at DeepSeek-V2-Lite's real
# shapes (dummy weights, bfloat16): shared-prefix, multi-turn and unshared workloads, cache on and off.
# Run from the repository root with the wheels in .whl/ (pyzmq, flashinfer-python and its dependencies). Logs and results go to $OUT.
# Budget: < 6 minutes.
set -uo pipefail
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT/results"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 FLASHINFER_WORKSPACE_BASE=/tmp/flashinfer_ws FLASHINFER_CUDA_ARCH_LIST="9.0a"
t_start=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t_start ))s] $*"; }
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD:$PWD/router:$PWD/kernels"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
status=0
step() {  # name, time limit, command...: each step logs to $OUT/<name>.log; a failure does not stop the others
    local name=$1 limit=$2
    shift 2
    stamp "$name"
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log" | grep -v "Loading safetensors\|it/s\]" | tail -n 25
    local rc=${PIPESTATUS[0]}
    [ "$rc" -ne 0 ] && status=1
    find benchmarks/results -type f -newer "$OUT/gpu.txt" -exec cp {} "$OUT/results/" \;
    stamp "$name rc=$rc"
}
step pytest_gpu 150 python3 -m pytest -m gpu -q -p no:cacheprovider tests/engine/test_gpu_engine.py -k prefix_cache
step prefix_cache_gpu 300 python3 benchmarks/bench_prefix_cache.py --model-path deepseek-v2-lite \
    --load-format dummy --device cuda --dtype bfloat16 --repeats 2 --tag h200
stamp "total; exit $status"
exit $status
