#!/usr/bin/env bash
# One GPU: the KV stream with device memory at both ends. The GPU tests of the stream (CUDA layers staged to
# pinned memory on the prefill, chunks landed in pinned staging and copied to CUDA pages on every decode
# rank: byte-exact, draft KV along, aborted rooms giving back every buffer), then bench_transfer.py with
# --device cuda (prefill and decode processes on the same GPU, loopback TCP between them) and the same in
# host memory on this machine for reference, then bench_pd_ttft.py with every server on the GPU.
# Run from the repository root with the wheels in .whl/ (pyzmq and the rest the servers need). Logs and
# results go to $OUT. Budget: < 9 minutes.
set -uo pipefail
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT/results"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
t_start=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t_start ))s] $*"; }
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD:$PWD/router:$PWD/kernels"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
lscpu | grep -i "model name\|^CPU(s)" | tee -a "$OUT/gpu.txt"
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
step pytest_kv_stream_gpu 120 python3 -m pytest -m gpu -q -p no:cacheprovider tests/disagg/test_kv_stream_gpu.py
step pytest_kv_stream_cpu 150 python3 -m pytest -q -p no:cacheprovider tests/disagg/test_kv_stream_pages.py \
    tests/disagg/test_kv_stream.py
step transfer_gpu 120 python3 benchmarks/bench_transfer.py --device cuda --prompt-lens 256,1024,4096,8192 \
    --repeats 5 --name transfer_h200_cuda
step transfer_host 90 python3 benchmarks/bench_transfer.py --device cpu --prompt-lens 256,1024,4096,8192 \
    --repeats 5 --name transfer_h200_host
step pd_ttft_gpu 150 python3 benchmarks/bench_pd_ttft.py --device cuda --decode-tp 1 \
    --lengths 256,1024,4096,8192 --repeats 3 --name pd_ttft_h200
stamp "total; exit $status"
exit $status
