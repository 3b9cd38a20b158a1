#!/usr/bin/env bash
# Speculative decoding on one GPU: the GPU tests of speculative blocks in CUDA graphs (draft decode steps,
# calibrations, verification against eager steps; one-device EasySpec against the layers one by one;
# greedy equality with plain decoding in float32) and of the decode graphs they extend, then
# bench_spec.py on cuda at batch 1 and batch 8: plain, standard and one-device EasySpec, bfloat16 (the MoE
# layers' grouped GEMM is captured only there), CUDA graphs on.
# Run from the repository root; wheels in .whl/ (if any) are installed first. Logs and tables go to $OUT.
# Budget: < 8 minutes.
set -uo pipefail
source "$(dirname "$0")/gpu_common.sh"

step pytest_spec_graphs 170 python3 -m pytest -m gpu -q -p no:cacheprovider -x \
    tests/speculative/test_spec_graphs_gpu.py
step pytest_spec 130 python3 -m pytest -m gpu -q -p no:cacheprovider -k "not tp2" \
    tests/speculative/test_spec_gpu.py tests/engine/test_cuda_graph_gpu.py
step spec_b1 130 python3 benchmarks/bench_spec.py --device cuda --dtype bfloat16 --attention-backend triton \
    --tp-size 1 --batch-size 1 --num-prompts 4 --new-tokens 128 --ks 2,4 --group-sizes 4 \
    --cuda-graph-max-bs 8 --name spec_decode_"$GPU"_b1
step spec_b8 110 python3 benchmarks/bench_spec.py --device cuda --dtype bfloat16 --attention-backend triton \
    --tp-size 1 --batch-size 8 --num-prompts 8 --new-tokens 128 --ks 2,4 --group-sizes 4 \
    --cuda-graph-max-bs 8 --name spec_decode_"$GPU"_b8
stamp "total; exit $status"
exit $status
