#!/usr/bin/env bash
# One GPU: the KV stream with device memory at both ends. The GPU tests of the stream (CUDA layers staged to
# pinned memory on the prefill, chunks landed in pinned staging and copied to CUDA pages on every decode
# rank: byte-exact, draft KV along, aborted rooms giving back every buffer), then bench_transfer.py with
# --device cuda (prefill and decode processes on the same GPU, loopback TCP between them) and the same in
# host memory on this machine for reference, then bench_pd_ttft.py with every server on the GPU and with
# every server on this machine's CPUs (decode T=2, g=2, as on the CPU machine).
# Run from the repository root with the wheels in .whl/ (pyzmq, fastapi and the rest the servers need). Logs
# and results go to $OUT. Budget: < 10 minutes.
set -uo pipefail
source "$(dirname "$0")/gpu_common.sh"
lscpu | grep -i "model name\|^CPU(s)" | tee -a "$OUT/gpu.txt"
step pytest_kv_stream_gpu 120 python3 -m pytest -m gpu -q -p no:cacheprovider tests/disagg/test_kv_stream_gpu.py
step transfer_gpu 100 python3 benchmarks/bench_transfer.py --device cuda --prompt-lens 256,1024,4096,8192 \
    --repeats 5 --name transfer_h200_cuda
step transfer_host 80 python3 benchmarks/bench_transfer.py --device cpu --prompt-lens 256,1024,4096,8192 \
    --repeats 5 --name transfer_h200_host
step pd_ttft_gpu 120 python3 benchmarks/bench_pd_ttft.py --device cuda --decode-tp 1 \
    --lengths 256,1024,4096,8192 --repeats 3 --name pd_ttft_h200
step pd_ttft_host 130 python3 benchmarks/bench_pd_ttft.py --device cpu --lengths 256,1024,4096,8192 \
    --repeats 3 --name pd_ttft_h200_host
stamp "total; exit $status"
exit $status
