"""The shipped deploy files the deploy tests read, and the Dockerfiles as (instruction, arguments) pairs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
UNIT = DEPLOY / "systemd" / "edge-agent.service"
# the one recipe, for linux/amd64 and linux/arm64; Dockerfile.arm64 is it with the architecture fixed
DOCKERFILE = ROOT / "Dockerfile"
DOCKERFILE_ARM64 = ROOT / "Dockerfile.arm64"
DOCKERFILES = (DOCKERFILE, DOCKERFILE_ARM64)
SMOKE = DEPLOY / "build-and-smoke.sh"
SMOKE_ARM64 = DEPLOY / "arm64" / "build-and-smoke.sh"  # the old path: the arm64 smoke


def instructions(dockerfile: Path = DOCKERFILE) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", dockerfile.read_text(encoding="utf-8"))
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out
