#!/usr/bin/env bash
# Train models/mla-deep on one GPU (preset target-deep: 16 layers, hidden 384, 46.4M parameters, 93 MB in
# bf16) with the shipped target's tokenizer, so that models/mla-tiny-draft drafts for it; its model card and
# held-out table are written beside the weights, as for the shipped models. Then speculative decoding with
# it on that GPU, batch 1 and 8 (plain, standard, one-device EasySpec; bf16, CUDA graphs).
# Run from the repository root. Logs and tables go to $OUT; the model to $OUT/mla-deep as well, so that it
# comes back for the CPU benchmark (bench_spec.py --target models/mla-deep --device cpu --threads 1).
# Budget: < 9 minutes (training 330 s).
set -uo pipefail
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT/results"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH="$PWD:$PWD/router:$PWD/kernels"
t_start=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t_start ))s] $*"; }

stamp train
timeout 480 python3 -m training.train --preset target-deep --tokenizer models/mla-tiny --out models/mla-deep \
    --device cuda --time-budget 330 2>&1 | tee "$OUT/train.log" | tail -n 20
cp -r models/mla-deep "$OUT/mla-deep"
for b in 1 8; do
    stamp "spec b$b"
    timeout 100 python3 benchmarks/bench_spec.py --target models/mla-deep --device cuda --dtype bfloat16 \
        --attention-backend triton --batch-size "$b" --num-prompts "$b" --new-tokens 128 --ks 2,4 \
        --group-sizes 4 --cuda-graph-max-bs 8 --name "spec_decode_deep_h200_b$b" 2>&1 \
        | tee "$OUT/spec_b$b.log" | tail -n 12
done
cp benchmarks/results/spec_decode_deep_* "$OUT/results/" 2>/dev/null
stamp total
