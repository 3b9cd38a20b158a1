#!/usr/bin/env bash
# The router in front of one prefill and one decode server (more: extra --prefill/--decode flags pass through).
# PREFILL ("URL BOOTSTRAP_PORT"), DECODE (URL), HOST (0.0.0.0), PORT (30000).
set -euo pipefail
read -r -a prefill <<< "${PREFILL:?set PREFILL to \"http://host:port bootstrap_port\"}"
exec python -m tpla_serve.launch --role router --host "${HOST:-0.0.0.0}" --port "${PORT:-30000}" \
    --prefill "${prefill[@]}" --decode "${DECODE:?set DECODE to the decode server URL}" "$@"
