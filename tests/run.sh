#!/usr/bin/env bash
# The test command: sets up everything on a fresh Debian/Ubuntu machine, then runs lint, types and tests.
#   bash tests/run.sh            # everything
#   bash tests/run.sh -k modbus  # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v mbpoll >/dev/null 2>&1 || need+=(mbpoll)
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)  # verifies the shipped systemd unit
if [ ${#need[@]} -gt 0 ]; then
  echo "installing with apt: ${need[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]'

echo "== ruff"; .venv/bin/ruff check edge_agent tests bench
echo "== mypy"; .venv/bin/mypy
echo "== import contract"; .venv/bin/lint-imports
echo "== pytest"; .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
