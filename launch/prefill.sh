#!/usr/bin/env bash
# A prefill server: exact MLA, streams each prompt's latent KV (and a draft's, with DRAFT) to decode servers.
# MODEL, TP (1), TRANSFORM (hadamard: the decode servers' latent transform), HOST (0.0.0.0), PORT (30001),
# BOOTSTRAP_PORT (8998), DRAFT (none); extra flags pass through.
set -euo pipefail
args=(--role prefill --disaggregation-mode prefill --model-path "${MODEL:?set MODEL to a model directory}"
      --tp-size "${TP:-1}" --tpla-transform "${TRANSFORM:-hadamard}" --host "${HOST:-0.0.0.0}" --port "${PORT:-30001}"
      --disaggregation-bootstrap-port "${BOOTSTRAP_PORT:-8998}")
if [ -n "${DRAFT:-}" ]; then args+=(--speculative-draft-model-path "$DRAFT"); fi
exec python -m tpla_serve.launch "${args[@]}" "$@"
