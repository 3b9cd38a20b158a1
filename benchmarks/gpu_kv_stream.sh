#!/usr/bin/env bash
# One GPU: the KV stream with device memory at both ends. The GPU tests of the stream (CUDA layers staged to
# pinned memory on the prefill, chunks landed in pinned staging and copied to CUDA pages on every decode
# rank: byte-exact, draft KV along, aborted rooms giving back every buffer), then bench_transfer.py with
# --device cuda (prefill and decode processes on the same GPU, loopback TCP between them), then
# bench_pd_ttft.py with every server on the GPU (its second table splits each request's time by server).
# Run from the repository root with the wheels in .whl/ (pyzmq, fastapi and the rest the servers need). Logs
# and results go to $OUT. Budget: < 10 minutes (about 7 of steps).
set -uo pipefail
source "$(dirname "$0")/gpu_common.sh"
lscpu | grep -i "model name\|^CPU(s)" | tee -a "$OUT/gpu.txt"
step pytest_kv_stream_gpu 120 python3 -m pytest -m gpu -q -p no:cacheprovider tests/disagg/test_kv_stream_gpu.py
step transfer_gpu 200 python3 benchmarks/bench_transfer.py --device cuda --prompt-lens 256,1024,4096,8192 \
    --repeats 11 --name transfer_"$GPU"_cuda
step pd_ttft_gpu 200 python3 benchmarks/bench_pd_ttft.py --device cuda --decode-tp 1 \
    --lengths 256,1024,4096,8192 --repeats 5 --name pd_ttft_"$GPU"
stamp "total; exit $status"
exit $status
