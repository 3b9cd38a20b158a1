#!/usr/bin/env bash
# Issue 6 on one GPU: FlashInfer MLA backend and decode CUDA graphs, correctness first, then kernel timing.
# Run from the repository root with the wheels in .whl/ (flashinfer-python, apache-tvm-ffi, pyzmq).
# Writes logs and the kernel results table under $OUT (default ./gpu_issue6_out). Budget: < 8 minutes.
set -uo pipefail
OUT="${OUT:-$PWD/gpu_issue6_out}"
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1
export FLASHINFER_WORKSPACE_BASE=/tmp/flashinfer_ws FLASHINFER_CUDA_ARCH_LIST="9.0a" MAX_JOBS=16
if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null; then
    CUDA_HOME="$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")"
    export CUDA_HOME
fi

t_start=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t_start ))s] $*"; }

python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD:$PWD/router:$PWD/kernels"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"

stamp "FlashInfer JIT: MLA decode modules for head_dim_ckv 512, 256, 128 (bf16, sm_90a), built in parallel"
timeout 180 python3 - <<'PY' 2>&1 | tee "$OUT/flashinfer_jit.log"
import time, torch
import flashinfer
from flashinfer.jit import build_jit_specs
from flashinfer.jit.attention import gen_batch_mla_module
from flashinfer.utils import determine_mla_backend
backend = determine_mla_backend(torch.device("cuda"))
t = time.time()
specs = [gen_batch_mla_module(backend, torch.bfloat16, torch.bfloat16, torch.bfloat16, torch.int32, ckv, 64, False)
         for ckv in (512, 256, 128)]
build_jit_specs(specs)
print(f"flashinfer {flashinfer.__version__} backend {backend}: built 3 MLA modules in {time.time() - t:.0f} s")
PY
stamp "JIT done"

status=0
run_tests() {  # name, time limit, files...: one pytest run per group, so a failure hides no other group
    local name=$1 limit=$2
    shift 2
    stamp "GPU tests: $name"
    timeout "$limit" python3 -m pytest -m gpu -x -q -p no:cacheprovider "$@" 2>&1 | tee "$OUT/pytest_$name.log"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -ne 0 ] && status=1
    stamp "GPU tests: $name rc=$rc"
}
run_tests flashinfer 90 tests/kernels/test_flashinfer_gpu.py
run_tests cuda_graph 180 tests/engine/test_cuda_graph_gpu.py tests/engine/test_gpu_engine.py

stamp "kernel benchmark (quick grid, with FlashInfer columns)"
timeout 150 python3 benchmarks/bench_decode_kernel.py --quick --out-dir "$OUT/results" 2>&1 | tee "$OUT/bench_decode_kernel.log"
bench_rc=${PIPESTATUS[0]}
[ "$bench_rc" -ne 0 ] && status=1
stamp "benchmark rc=$bench_rc"

echo "==================== summary ===================="
grep -h "built 3 MLA modules" "$OUT/flashinfer_jit.log" || echo "FlashInfer JIT build: FAILED (see flashinfer_jit.log)"
for f in "$OUT"/pytest_*.log; do echo "$(basename "$f"): $(tail -n 1 "$f")"; done
grep -h "^paper " "$OUT/bench_decode_kernel.log" || true
grep -h "flashinfer head_dim_ckv\|flashinfer (" "$OUT/bench_decode_kernel.log" | head -n 12 || true
ls "$OUT/results" 2>/dev/null
stamp "total; exit $status"
exit $status
