#!/usr/bin/env bash
# The arm64 smoke test's old path, kept for the commands and jobs that call it: the same as
#   bash deploy/build-and-smoke.sh --platform linux/arm64 [ARGS]
# (Dockerfile.arm64 under qemu on x86_64, cache /var/cache/edge-agent-arm64; see that script's --help).
exec bash "$(dirname "${BASH_SOURCE[0]}")/../build-and-smoke.sh" --platform linux/arm64 "$@"
