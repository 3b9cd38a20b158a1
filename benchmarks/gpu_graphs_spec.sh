#!/usr/bin/env bash
# The GPU tests (FlashInfer backend, CUDA graphs, engine backends), then end-to-end decode with CUDA graphs
# (V3 attention shapes; with GPUS=2: TP=2, g=1 vs g=2; with GPUS=1: TP=1, graphs on vs off), speculative
# decoding (plain / standard / easyspec at TP=GPUS) and the kernel table with FlashInfer's MLA beside ours.
# Run from the repository root with the wheels in .whl/ (flashinfer-python, apache-tvm-ffi, pyzmq).
# Logs and results go to $OUT. Budget: < 9.5 minutes.
set -uo pipefail
source "$(dirname "$0")/gpu_common.sh"
GPUS="${GPUS:-2}"

step pytest_flashinfer 120 python3 -m pytest -m gpu -q -p no:cacheprovider tests/kernels/test_flashinfer_gpu.py
if [ "$GPUS" -ge 2 ]; then
    step pytest_engine 170 python3 -m pytest -m gpu -q -p no:cacheprovider \
        tests/engine/test_cuda_graph_gpu.py tests/engine/test_gpu_engine.py tests/speculative/test_spec_gpu.py
    step e2e_v3attn 170 python3 benchmarks/bench_e2e_decode.py --model deepseek-v3 \
        --override '{"num_hidden_layers": 4, "first_k_dense_replace": 4}' --tp 2 --contexts 4096,16384,32768 \
        --attention-backend triton --steps 12 --tag v3attn-4layers-graphs
    step spec 110 python3 benchmarks/bench_spec.py --tp-size 2 --device cuda --dtype float32 --ks 2,4,6 \
        --group-sizes 2 --num-prompts 16 --new-tokens 128 --name spec_decode_${GPU}x2
    step e2e_v3attn_eager 90 python3 benchmarks/bench_e2e_decode.py --model deepseek-v3 \
        --override '{"num_hidden_layers": 4, "first_k_dense_replace": 4}' --tp 2 --contexts 4096,32768 \
        --attention-backend triton --steps 12 --disable-cuda-graph --tag v3attn-4layers-eager
else
    step pytest_engine 170 python3 -m pytest -m gpu -q -p no:cacheprovider -k "not tp2" \
        tests/engine/test_cuda_graph_gpu.py tests/engine/test_gpu_engine.py tests/speculative/test_spec_gpu.py
    for graphs in "" "--disable-cuda-graph"; do
        step "e2e_v3attn_tp1${graphs:+_eager}" 100 python3 benchmarks/bench_e2e_decode.py --model deepseek-v3 \
            --override '{"num_hidden_layers": 4, "first_k_dense_replace": 4}' --tp 1 --groups 1 \
            --contexts 4096,32768 --attention-backend triton --steps 12 $graphs \
            --tag "v3attn-4layers-tp1${graphs:+-eager}"
    done
    step spec 110 python3 benchmarks/bench_spec.py --tp-size 1 --device cuda --dtype float32 --ks 2,4,6 \
        --group-sizes "" --num-prompts 16 --new-tokens 128 --name spec_decode_${GPU}x1
fi
step kernel 100 python3 benchmarks/bench_decode_kernel.py --quick --skip-grid --out-dir "$OUT/results"
stamp "total; exit $status"
exit $status
