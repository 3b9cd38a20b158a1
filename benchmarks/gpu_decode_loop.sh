#!/usr/bin/env bash
# One GPU: the GPU tests (FlashInfer backend, CUDA graphs from the request table, engine graphs on/off,
# speculative greedy equality), then decode TPOT against the GPU's busy time per step (V3 attention shapes,
# B=256, 4K and 32K, overlap scheduling on and off). Run from the repository root with the wheels in .whl/
# (pyzmq, flashinfer-python 0.6.0, apache-tvm-ffi, nvidia-cudnn-frontend, the nvidia-cutlass-dsl meta
# wheel). Logs and results go to $OUT. Budget: < 9 minutes.
set -uo pipefail
source "$(dirname "$0")/gpu_common.sh"
step pytest_gpu 300 python3 -m pytest -m gpu -q -p no:cacheprovider -k "not tp2" \
    tests/kernels/test_flashinfer_gpu.py tests/engine/test_cuda_graph_gpu.py tests/engine/test_gpu_engine.py \
    tests/speculative/test_spec_gpu.py
step decode_busy 220 python3 benchmarks/bench_decode_busy.py --contexts 4096,32768 --batch 256 --tag "$GPU"
stamp "total; exit $status"
exit $status
