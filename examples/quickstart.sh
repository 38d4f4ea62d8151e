#!/usr/bin/env bash
# The main job, for now: the simulated pump skid and the agent polling it, on this machine.
# Sets up a venv on first use. Ctrl-C stops both.
#   bash examples/quickstart.sh                         # normal operation
#   bash examples/quickstart.sh --fault cavitation@20+30 # with a scheduled fault
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/edge-agent ]; then
  echo "setting up .venv (first run only)…"
  python3 -m venv .venv
  .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q --disable-pip-version-check -e .
fi
port="${SIM_MODBUS_PORT:-5020}"
.venv/bin/edge-agent simulate --modbus-port "$port" "$@" &
sim=$!
trap 'kill $sim 2>/dev/null; wait $sim 2>/dev/null' EXIT
.venv/bin/edge-agent check examples/simulator.yaml
SIM_MODBUS_PORT="$port" .venv/bin/edge-agent run examples/simulator.yaml --report-interval 2
