#!/usr/bin/env bash
# The arm64 smoke test's old path, kept for the commands and jobs that call it: deploy/build-and-smoke.sh.
exec bash "$(dirname "${BASH_SOURCE[0]}")/../build-and-smoke.sh" "$@"
