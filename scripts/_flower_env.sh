# Sourced by the deployment scripts: the environment every Flower process of fedcollm runs in.
# FLWR_HOME defaults to ./.flwr/<role> (each process its own); telemetry and runtime dependency
# installation are off (the SuperLink would otherwise pip-install the app's dependencies).
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${FEDCOLLM_VENV:-$repo/.venv}"
if [[ -x "$venv/bin/flower-superlink" ]]; then
  export PATH="$venv/bin:$PATH"
fi
export FLWR_TELEMETRY_ENABLED=0
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export FLWR_SUPEREXEC_TASK_POLL_INTERVAL="${FLWR_SUPEREXEC_TASK_POLL_INTERVAL:-0.2}"
export TOKENIZERS_PARALLELISM=false

# run CMD...: exec it, or only print it when DRY_RUN=1.
run() {
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    printf '%q ' "$@"; printf '\n'
  else
    exec "$@"
  fi
}
