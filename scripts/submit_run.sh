#!/usr/bin/env bash
# Submit an experiment to a running SuperLink and follow its log until it finishes.
#
#   scripts/submit_run.sh --superlink HOST:PORT [--ca FILE] CONFIG [KEY=VALUE ...]
#
# CONFIG is the experiment TOML as seen from the SuperLink's machine (the ServerApp runs there);
# KEY=VALUE pairs are Flower run config (see [tool.flwr.app.config] in pyproject.toml), e.g.
#   out="/data/runs/arc" secagg=true set="federation.rounds=2"
set -euo pipefail
source "$(dirname "$0")/_flower_env.sh"
superlink="" ca=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --superlink) superlink=$2; shift 2 ;;
    --ca) ca=$2; shift 2 ;;
    *) break ;;
  esac
done
config=${1:?usage: submit_run.sh --superlink HOST:PORT [--ca FILE] CONFIG [KEY=VALUE ...]}
shift
: "${superlink:?--superlink HOST:PORT is required}"
export FLWR_HOME="${FLWR_HOME:-$PWD/.flwr/cli}"
mkdir -p "$FLWR_HOME"
{
  printf '[superlink]\ndefault = "fedcollm"\n\n[superlink.fedcollm]\naddress = "%s"\n' "$superlink"
  if [[ -n "$ca" ]]; then printf 'root-certificates = "%s"\n' "$(realpath "$ca")"; else printf 'insecure = true\n'; fi
} > "$FLWR_HOME/config.toml"
run_config="experiment=\"$(realpath "$config")\""
for pair in "$@"; do run_config="$run_config $pair"; done
run flwr run "$repo" fedcollm --run-config "$run_config" --stream
