#!/usr/bin/env bash
# The whole deployment on this machine with the scripts above: local CA, a SuperLink with TLS,
# one SuperNode per client (each its own process), the run, and everything stopped afterwards.
#
#   scripts/deploy_local.sh CONFIG [KEY=VALUE ...]      (KEY=VALUE: Flower run config)
#
# Work files (certificates, FLWR_HOMEs, logs) go to ${WORKDIR:-runs/deploy-local}.
# `fedcollm deploy CONFIG` does the same from Python.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
config=$(realpath "${1:?usage: deploy_local.sh CONFIG [KEY=VALUE ...]}")
shift
work=$(realpath -m "${WORKDIR:-runs/deploy-local}")
mkdir -p "$work/logs"
clients=$("$here/../.venv/bin/python" -c "import sys; from fedcollm.config import load_config; print(load_config(sys.argv[1]).federation.num_clients)" "$config")
port=${PORT:-9093}

[[ -f "$work/certs/ca.crt" ]] || "$here/make_certs.sh" "$work/certs" >/dev/null
pids=()
cleanup() {  # stop every process group started here
  for pid in "${pids[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
  sleep 2
  for pid in "${pids[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

setsid "$here/start_superlink.sh" --certs "$work/certs" --port "$port" --home "$work/.flwr/superlink" \
  > "$work/logs/superlink.log" 2>&1 &
pids+=($!)
sleep 3
for ((k = 0; k < clients; k++)); do
  setsid "$here/start_supernode.sh" --superlink "127.0.0.1:$port" --ca "$work/certs/ca.crt" \
    --partition-id "$k" --num-partitions "$clients" --port $((port + 100 + k)) \
    --home "$work/.flwr/supernode-$k" > "$work/logs/supernode-$k.log" 2>&1 &
  pids+=($!)
done
FLWR_HOME="$work/.flwr/cli" "$here/submit_run.sh" --superlink "127.0.0.1:$port" --ca "$work/certs/ca.crt" \
  "$config" "$@" 2>&1 | tee "$work/logs/run.log"
