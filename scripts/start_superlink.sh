#!/usr/bin/env bash
# Start the SuperLink on the server machine (runs in the foreground; Ctrl-C stops it).
#
#   scripts/start_superlink.sh [--certs DIR] [--host ADDR] [--port PORT] [--auth] [--home DIR]
#
#   --certs DIR   TLS with DIR/ca.crt, DIR/server.pem, DIR/server.key (scripts/make_certs.sh);
#                 without it the SuperLink runs --insecure (plain HTTP, for tests only)
#   --host ADDR   address to listen on (default 127.0.0.1; 0.0.0.0 for other machines)
#   --port PORT   Fleet/Control/Runtime HTTP API port (default 9093)
#   --auth        only SuperNodes whose public keys were registered may connect (needs --certs)
#   --home DIR    FLWR_HOME (default ./.flwr/superlink)
set -euo pipefail
source "$(dirname "$0")/_flower_env.sh"
certs="" host=127.0.0.1 port=9093 auth=0 home="$PWD/.flwr/superlink"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --certs) certs=$2; shift 2 ;;
    --host) host=$2; shift 2 ;;
    --port) port=$2; shift 2 ;;
    --auth) auth=1; shift ;;
    --home) home=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
export FLWR_HOME="$home"
mkdir -p "$FLWR_HOME"
args=(flower-superlink --host "$host" --port "$port" --disable-runtime-dependency-installation)
if [[ -n "$certs" ]]; then
  args+=(--ssl-ca-certfile "$certs/ca.crt" --ssl-certfile "$certs/server.pem" --ssl-keyfile "$certs/server.key")
else
  args+=(--insecure)
fi
if [[ $auth == 1 ]]; then
  args+=(--enable-supernode-auth)
fi
run "${args[@]}"
