#!/usr/bin/env bash
# A decode server: TPLA-sharded latent KV cache over TP ranks, optionally speculating with a draft model.
# MODEL, TP (2), TPLA_GROUPS (2), TRANSFORM (hadamard), HOST (0.0.0.0), PORT (30002), DISAGG_HOST (the address
# prefill machines reach this one at; 127.0.0.1), SPEC (none | standard | easyspec) with DRAFT and K (4).
set -euo pipefail
args=(--role decode --disaggregation-mode decode --model-path "${MODEL:?set MODEL to a model directory}"
      --tp-size "${TP:-2}" --tpla-groups "${TPLA_GROUPS:-2}" --tpla-transform "${TRANSFORM:-hadamard}"
      --host "${HOST:-0.0.0.0}" --port "${PORT:-30002}" --disaggregation-host "${DISAGG_HOST:-127.0.0.1}")
if [ "${SPEC:-none}" != none ]; then
    args+=(--speculative-algorithm "$SPEC" --speculative-draft-model-path "${DRAFT:?SPEC needs DRAFT}"
           --speculative-num-draft-tokens "${K:-4}")
fi
exec python -m tpla_serve.launch "${args[@]}" "$@"
