# Sourced by the benchmarks/gpu_*.sh scripts, from the repository root: the environment every GPU run shares
# (wheels from .whl/ installed into /tmp/site, NCCL's NVLink multicast off, FlashInfer's JIT settings), the
# machine's name in $OUT/gpu.txt and the GPU's short name in $GPU (result file names), and step(): one timed
# command logged to $OUT/<name>.log, whose failure is recorded in $status without stopping the steps after
# it; result tables it writes are copied to $OUT/results.
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
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH="/tmp/site:$PWD:$PWD/router:$PWD/kernels"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
# The GPU's short name for result files (h100, h200, ...): a table says which card measured it.
GPU=$(grep -o -m1 "[HABL][0-9]\{2,3\}" "$OUT/gpu.txt" | tr "[:upper:]" "[:lower:]")
GPU=${GPU:-gpu}
status=0
step() {  # name, time limit, command...
    local name=$1 limit=$2
    shift 2
    stamp "$name"
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log" | grep -v "Loading safetensors\|it/s\]" | tail -n 25
    local rc=${PIPESTATUS[0]}
    [ "$rc" -ne 0 ] && status=1
    find benchmarks/results -type f -newer "$OUT/gpu.txt" -exec cp {} "$OUT/results/" \;
    stamp "$name rc=$rc"
}
