# edge-agent for industrial PCs, linux/amd64 and linux/arm64: one recipe, the platform from --platform.
#
#   docker buildx build --platform linux/amd64 -t edge-agent:amd64 .
#   docker buildx build --platform linux/arm64 -t edge-agent:arm64 .
#   docker buildx build --platform linux/amd64,linux/arm64 -t REGISTRY/edge-agent:0.1.0 --push .
#   podman build --platform linux/amd64 --format docker -t edge-agent:amd64 .
#   (--format docker keeps the HEALTHCHECK; the OCI image format has no such field)
#
#   docker run --read-only --tmpfs /tmp -v edge-agent-state:/var/lib/edge-agent \
#     -v ./config.yaml:/etc/edge-agent/config.yaml:ro edge-agent:amd64
#
# Dockerfile.arm64 is this recipe with the architecture fixed to arm64 (EDGE_AGENT_ARCH below), for the
# arm64 build commands already in use; tests/deploy fails when the two differ in anything else.
#
# Everything pip installs is a wheel for the target (--only-binary=:all:): nothing is compiled, natively,
# under emulation or elsewhere. The project itself is pure Python (its build needs setuptools, also a wheel).
#
# Emulated builds and runs (qemu-user, e.g. arm64 on x86_64): Debian 12's qemu 7.2 makes LiteRT's default
# XNNPACK delegate segfault in allocate_tensors(); qemu >= 10 (bookworm-backports) runs it fine. Native
# builds and real hardware are unaffected. deploy/build-and-smoke.sh sets up the working emulator.
#
# Runtime contract (see deploy/README.md):
#   config     /etc/edge-agent/config.yaml (mounted, read-only); ${ENV} and EDGE_AGENT__SECTION__KEY overrides
#   secrets    files under /run/secrets/ (mqtt.password_file: /run/secrets/mqtt_password)
#   state      /var/lib/edge-agent (volume): the MQTT outbox, calibrated models
#   scratch    /tmp (tmpfs); the root filesystem can be read-only
#   health     GET http://127.0.0.1:9108/healthz (observe.listen), metrics on /metrics
#   logs       stderr; anomaly events on stdout until MQTT publishing is configured
#   user       10001:10001 (numeric, so Kubernetes runAsNonRoot can check it)

ARG BASE_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------- the platform check, the runtime dependencies as a file
FROM ${BASE_IMAGE} AS requirements
# The platform: --platform sets TARGETARCH (BuildKit and podman do). pip picks wheels for the base image's
# interpreter, not for the flag, so that interpreter must run the target's binaries: a base image of the
# wrong architecture (a stand-in imported under a false --arch) stops here. EDGE_AGENT_ARCH, when set,
# fixes the file's architecture (Dockerfile.arm64: arm64 whatever --platform says).
ARG TARGETARCH
ARG EDGE_AGENT_ARCH=
RUN python3 -c "import os, platform, sys; m = platform.machine(); a = {'x86_64': 'amd64', 'aarch64': 'arm64'}.get(m, m); \
want = {os.environ.get('TARGETARCH') or a, os.environ.get('EDGE_AGENT_ARCH') or a} - {a}; \
sys.exit('the base image runs ' + m + ' binaries, the build is for ' + ' and '.join(sorted(want)) + ': pass --platform linux/' + min(want) + ' and a base image of that platform' if want else None)"
# requirements.txt is copied into the builder by content: editing other parts of pyproject.toml (dev
# extras, tool settings) leaves the slow dependency layer below cached, and so does this stage's check.
COPY pyproject.toml /src/
RUN python3 -c "import tomllib; print('\n'.join(tomllib.load(open('/src/pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /requirements.txt

# ---------------------------------------------------------------- builder: a venv of wheels
FROM ${BASE_IMAGE} AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore

WORKDIR /src
RUN python3 -m venv /opt/venv
COPY --from=requirements /requirements.txt /tmp/requirements.txt
RUN /opt/venv/bin/pip install --only-binary=:all: -r /tmp/requirements.txt

COPY pyproject.toml README.md ./
COPY edge_agent ./edge_agent
# The runtime needs neither the installer nor test suites; pip has already compiled the .pyc files
# (the root filesystem is read-only at run time, so nothing could write them later).
RUN /opt/venv/bin/pip install --only-binary=:all: --no-deps . \
 && (/opt/venv/bin/pip uninstall -y -q pip setuptools || true) \
 && rm -rf /opt/venv/lib/python3*/site-packages/numpy/*/tests /opt/venv/lib/python3*/site-packages/numpy/tests

# ---------------------------------------------------------------- runtime
FROM ${BASE_IMAGE}

LABEL org.opencontainers.image.title="edge-agent" \
      org.opencontainers.image.description="PLC tags in (Modbus, OPC UA, S7), on-device TFLite scoring, anomaly events out" \
      org.opencontainers.image.licenses="Apache-2.0"

# A fixed uid/gid written straight into the account files: the slim base and a minbase Debian both
# have /etc/passwd, not necessarily useradd.
RUN echo "edge-agent:x:10001:10001:edge-agent:/var/lib/edge-agent:/usr/sbin/nologin" >> /etc/passwd \
 && echo "edge-agent:x:10001:" >> /etc/group \
 && mkdir -p /var/lib/edge-agent /etc/edge-agent /opt/edge-agent \
 && chown 10001:10001 /var/lib/edge-agent \
 && chmod 0750 /var/lib/edge-agent

COPY --from=builder /opt/venv /opt/venv
COPY models/ /opt/edge-agent/models/
COPY deploy/config/edge-agent.yaml /opt/edge-agent/config.example.yaml

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/var/lib/edge-agent \
    TMPDIR=/tmp

# The outbox and anything the agent writes (calibrated bundles) live here; mount a volume.
VOLUME ["/var/lib/edge-agent"]
WORKDIR /var/lib/edge-agent
USER 10001:10001
EXPOSE 9108

# /healthz on the observe port: EDGE_AGENT__OBSERVE__LISTEN's port, else the config file's
# observe.listen port, else 9108. When observe is off (neither sets a listen address) nothing can be
# asked, and the check passes as long as the agent runs (it is PID 1: when it dies, the container stops).
HEALTHCHECK --interval=30s --timeout=5s --start-period=90s --retries=3 \
  CMD ["python", "-c", "import os,re,socket,sys,urllib.request as u; c='/etc/edge-agent/config.yaml'; t=open(c).read() if os.path.exists(c) else ''; e=os.environ.get('EDGE_AGENT__OBSERVE__LISTEN',''); m=re.search(r'^[^#\\n]*listen:\\s*[\"\\']?[^\\s\"\\']*:(\\d+)', t, re.M); p=int(e.rsplit(':',1)[1]) if e else int(m.group(1)) if m else 9108; s=socket.socket(); down=s.connect_ex(('127.0.0.1',p)); s.close(); sys.exit((1 if e or m else 0) if down else 0 if u.urlopen(f'http://127.0.0.1:{p}/healthz',timeout=4).status==200 else 1)"]

ENTRYPOINT ["edge-agent"]
CMD ["run", "/etc/edge-agent/config.yaml"]
