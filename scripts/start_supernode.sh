#!/usr/bin/env bash
# Start the SuperNode of client K on its machine (foreground; Ctrl-C stops it). The node config
# tells it which client it is; its private data stays in this process and the ClientApp
# processes it starts. Each ClientApp is forked from a warm executor started beside the node
# (fedcollm.engines.flower.clientapp_executor; --isolation process); --flower-executor lets
# Flower's SuperExec start a fresh ClientApp process per message instead (seconds per message).
#
#   scripts/start_supernode.sh --superlink HOST:PORT --partition-id K --num-partitions N
#                              [--data FILE] [--eval FILE] [--ca FILE] [--key FILE] [--port PORT] [--home DIR]
#                              [--node-config 'KEY=VALUE ...'] [--flower-executor]
#
#   --data FILE   this site's own training file (node config data-path; for experiments with
#                 task.client_source = "files"); read by this site's ClientApp, sent nowhere
#   --eval FILE   this site's own evaluation file (node config eval-path; for experiments with
#                 task.client_eval = true): only its scores leave the site
#   --ca FILE     the CA certificate that signed the SuperLink's (TLS); without it: --insecure
#   --key FILE    this SuperNode's private key, when the SuperLink runs with --auth
#   --port PORT   this SuperNode's local Runtime API port (default 9094; must differ between
#                 SuperNodes on one machine)
#   --home DIR    FLWR_HOME (default ./.flwr/supernode-K)
#   --node-config further node config, e.g. 'device="cuda:0" threads=8 worker-idle-timeout=7200'
#                 (docs/deployment.md lists the keys)
set -euo pipefail
source "$(dirname "$0")/_flower_env.sh"
superlink="" partition="" partitions="" data="" evaluation="" ca="" key="" port=9094 home="" extra=""
warm=1
while [[ $# -gt 0 ]]; do
  case "$1" in
    --superlink) superlink=$2; shift 2 ;;
    --partition-id) partition=$2; shift 2 ;;
    --num-partitions) partitions=$2; shift 2 ;;
    --data) data=$2; shift 2 ;;
    --eval) evaluation=$2; shift 2 ;;
    --ca) ca=$2; shift 2 ;;
    --key) key=$2; shift 2 ;;
    --port) port=$2; shift 2 ;;
    --home) home=$2; shift 2 ;;
    --node-config) extra=$2; shift 2 ;;
    --flower-executor) warm=0; shift ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
: "${superlink:?--superlink HOST:PORT is required}" "${partition:?--partition-id is required}"
: "${partitions:?--num-partitions is required}"
export FLWR_HOME="${home:-$PWD/.flwr/supernode-$partition}"
mkdir -p "$FLWR_HOME"
node_config="partition-id=$partition num-partitions=$partitions"
if [[ -n "$data" ]]; then
  [[ -e "$data" ]] || { echo "--data $data: no such file or folder" >&2; exit 2; }
  node_config+=" data-path=\"$(realpath "$data")\""
fi
if [[ -n "$evaluation" ]]; then
  [[ -e "$evaluation" ]] || { echo "--eval $evaluation: no such file or folder" >&2; exit 2; }
  node_config+=" eval-path=\"$(realpath "$evaluation")\""
fi
if [[ -n "$extra" ]]; then node_config+=" $extra"; fi
args=(flower-supernode --superlink "$superlink" --port "$port" --node-config "$node_config")
if [[ -n "$ca" ]]; then args+=(--root-certificates "$ca"); else args+=(--insecure); fi
if [[ -n "$key" ]]; then args+=(--auth-supernode-private-key "$key"); fi
if [[ "$warm" == 0 ]]; then run "${args[@]}"; exit 0; fi
args+=(--isolation process)
python="python3"
if [[ -x "$venv/bin/python" ]]; then python="$venv/bin/python"; fi
executor=("$python" -m fedcollm.engines.flower.clientapp_executor --runtime-api-address "127.0.0.1:$port" --insecure)
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  printf '%q ' "${args[@]}"; printf '\n'
  printf '%q ' "${executor[@]}"; printf '\n'
  exit 0
fi
# Both in the background, so that a signal to this script reaches its trap at once; whichever
# ends first (the node, or the executor) ends the site.
"${args[@]}" &
node=$!
"${executor[@]}" --parent-pid "$node" &
executor_pid=$!
trap 'kill "$node" "$executor_pid" 2>/dev/null || true; wait 2>/dev/null || true' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
wait -n "$node" "$executor_pid"
