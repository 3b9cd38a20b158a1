#!/usr/bin/env bash
# Speculative decoding on one GPU: the GPU tests of speculative blocks in CUDA graphs (draft decode steps,
# calibrations, verification against eager steps; one-device EasySpec against the layers one by one;
# greedy equality with plain decoding in float32) and of the decode graphs they extend, then
# bench_spec.py on cuda at batch 1 and batch 8: plain, standard and one-device EasySpec, bfloat16 (the MoE
# layers' grouped GEMM is captured only there), CUDA graphs on.
# Run from the repository root; wheels in .whl/ (if any) are installed first. Logs and tables go to $OUT.
# Budget: < 8 minutes.
set -uo pipefail
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT/results"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1
t_start=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t_start ))s] $*"; }
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH="/tmp/site:$PWD:$PWD/router:$PWD/kernels"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"

status=0
step() {  # name, time limit, command...: logs to $OUT/<name>.log; a failure does not stop the others
    local name=$1 limit=$2
    shift 2
    stamp "$name"
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log" | grep -v "Loading safetensors\|it/s\]" | tail -n 25
    local rc=${PIPESTATUS[0]}
    [ "$rc" -ne 0 ] && status=1
    find benchmarks/results -type f -newer "$OUT/gpu.txt" -exec cp {} "$OUT/results/" \;
    stamp "$name rc=$rc"
}

step pytest_spec_graphs 170 python3 -m pytest -m gpu -q -p no:cacheprovider -x \
    tests/speculative/test_spec_graphs_gpu.py
step pytest_spec 130 python3 -m pytest -m gpu -q -p no:cacheprovider -k "not tp2" \
    tests/speculative/test_spec_gpu.py tests/engine/test_cuda_graph_gpu.py
step spec_b1 130 python3 benchmarks/bench_spec.py --device cuda --dtype bfloat16 --attention-backend triton \
    --tp-size 1 --batch-size 1 --num-prompts 4 --new-tokens 128 --ks 2,4 --group-sizes 4 \
    --cuda-graph-max-bs 8 --name spec_decode_h200_b1
step spec_b8 110 python3 benchmarks/bench_spec.py --device cuda --dtype bfloat16 --attention-backend triton \
    --tp-size 1 --batch-size 8 --num-prompts 8 --new-tokens 128 --ks 2,4 --group-sizes 4 \
    --cuda-graph-max-bs 8 --name spec_decode_h200_b8
stamp "total; exit $status"
exit $status
