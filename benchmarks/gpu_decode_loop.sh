#!/usr/bin/env bash
# One GPU: the GPU tests (FlashInfer backend, CUDA graphs from the request table, engine graphs on/off,
# speculative greedy equality), then decode TPOT against the GPU's busy time per step (V3 attention shapes,
# B=256, 4K and 32K, overlap scheduling on and off). Run from the repository root with the wheels in .whl/
# (pyzmq, flashinfer-python 0.6.0, apache-tvm-ffi, nvidia-cudnn-frontend, the nvidia-cutlass-dsl meta
# wheel). Logs and results go to $OUT. Budget: < 9 minutes.
set -uo pipefail
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT/results"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 FLASHINFER_WORKSPACE_BASE=/tmp/flashinfer_ws FLASHINFER_CUDA_ARCH_LIST="9.0a" MAX_JOBS=16
if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null; then
    CUDA_HOME="$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")"
    export CUDA_HOME
fi
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
step pytest_gpu 300 python3 -m pytest -m gpu -q -p no:cacheprovider -k "not tp2" \
    tests/kernels/test_flashinfer_gpu.py tests/engine/test_cuda_graph_gpu.py tests/engine/test_gpu_engine.py \
    tests/speculative/test_spec_gpu.py
step decode_busy 220 python3 benchmarks/bench_decode_busy.py --contexts 4096,32768 --batch 256 --tag h200
stamp "total; exit $status"
exit $status
