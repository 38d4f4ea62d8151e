#!/usr/bin/env bash
# The main job on this machine: `edge-agent demo` (simulated pump skid with a scheduled fault, the agent,
# an MQTT broker and a live subscriber view). Sets up .venv with the demo extra on first use.
#   bash examples/quickstart.sh                                # cavitation 30 s in, two minutes
#   bash examples/quickstart.sh --fault bearing_wear@20 --duration 0   # until Ctrl-C
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/edge-agent ] || ! .venv/bin/python -c "import amqtt, rich" 2>/dev/null; then
  echo "setting up .venv (first run only)…"
  [ -x .venv/bin/python ] || python3 -m venv .venv
  .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[demo]'
fi
exec .venv/bin/edge-agent demo "$@"
