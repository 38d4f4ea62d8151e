#!/usr/bin/env bash
# Build the image for one platform with podman (no Docker daemon, no registry): natively when the platform
# is this machine's, under qemu emulation otherwise (arm64 on x86_64). Then run it against the simulated
# plant and a mosquitto broker on this host and check that the anomaly event of an injected fault
# arrives. Exits 0 only when it did.
#
#   sudo bash deploy/build-and-smoke.sh --platform linux/amd64   # Dockerfile
#   sudo bash deploy/build-and-smoke.sh --platform linux/arm64   # Dockerfile.arm64 (= deploy/arm64/build-and-smoke.sh)
#   bash deploy/build-and-smoke.sh --platform linux/arm64 --dry-run   # print the settings, do nothing
#
# Without --platform: this machine's own. Measured on 2 cores, x86_64:
#   linux/amd64 (native)      cold ~2.5 min (debootstrap ~45 s, build ~30 s, smoke ~70 s); warm ~70 s
#   linux/arm64 (emulated)    cold 11-14 min (debootstrap 5.5-7.5 min, pip 4.5-5 min, smoke ~70 s); warm
#                             ~70 s; after a change in edge_agent/ ~2.5 min; after a change of the runtime
#                             dependencies in pyproject.toml ~5 min
#
# Environment (all optional):
#   EDGE_AGENT_<ARCH>_CACHE cache dir of one platform (EDGE_AGENT_AMD64_CACHE, EDGE_AGENT_ARM64_CACHE;
#                           default /var/cache/edge-agent-<arch>): rootfs, qemu, podman storage
#   DOCKERFILE              the file to build (default: Dockerfile.arm64 for linux/arm64, else Dockerfile)
#   SMOKE_FAULT             simulator fault (default cavitation@20), counted from the simulator's start
#   SMOKE_EVENT_PATH        auto | mqtt | stdout: where the anomaly.start must show up (auto: mqtt when the
#                           image's agent publishes to MQTT, else the container's stdout)
#   SMOKE_EVENT_TIMEOUT     seconds from the simulator's start to wait for the event (default 150)
#   SMOKE_KEEP=1            keep the work dir (logs) and print its path
#   IMAGE                   tag to build (default localhost/edge-agent:<arch>)
#
# What it sets up on this machine (see ../../shared/notes/arm64-image.md for why): apt packages
# (podman, runc, debootstrap, mosquitto, mosquitto-clients) when missing; for an emulated platform,
# binfmt_misc with qemu-aarch64 10 from bookworm-backports (Debian 12's qemu 7.2 crashes LiteRT's
# XNNPACK delegate); podman config and storage of its own under the platform's cache dir
# (CONTAINERS_CONF / CONTAINERS_STORAGE_CONF, nothing in /etc/containers is changed); a local stand-in
# for python:3.11-slim-bookworm of the platform made by debootstrap, holding this machine's extra CA
# certificates (the stand-in only, never the Dockerfile).
set -Eeuo pipefail

usage() { sed -n '2,/^set -Eeuo/{/^set -Eeuo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; }

ARGS=("$@")
PLATFORM=""
DRY_RUN=""
while [ $# -gt 0 ]; do
  case $1 in
    --platform) [ $# -ge 2 ] || { echo "--platform needs a value: linux/amd64 or linux/arm64" >&2; exit 2; }
                PLATFORM=$2; shift 2 ;;
    --platform=*) PLATFORM=${1#--platform=}; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done

case $(uname -m) in
  x86_64) HOST_ARCH=amd64 ;;
  aarch64|arm64) HOST_ARCH=arm64 ;;
  *) HOST_ARCH=$(uname -m) ;;
esac
PLATFORM=${PLATFORM:-linux/$HOST_ARCH}
case $PLATFORM in
  linux/amd64) ARCH=amd64 ;;
  linux/arm64|linux/arm64/v8) ARCH=arm64; PLATFORM=linux/arm64 ;;
  *) echo "unsupported platform $PLATFORM: linux/amd64 or linux/arm64" >&2; exit 2 ;;
esac
if [ "$ARCH" = "$HOST_ARCH" ]; then
  MODE=native
elif [ "$ARCH" = arm64 ] && [ "$HOST_ARCH" = amd64 ]; then
  MODE=emulated   # qemu-aarch64 10 through binfmt_misc
else
  echo "$PLATFORM on a $(uname -m) machine: only linux/arm64 on x86_64 is emulated here; build it natively" >&2
  exit 2
fi

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache_var=EDGE_AGENT_${ARCH^^}_CACHE
CACHE=${!cache_var:-/var/cache/edge-agent-$ARCH}
RUNDIR=/run/edge-agent-$ARCH
IMAGE=${IMAGE:-localhost/edge-agent:$ARCH}
BASE=localhost/bookworm-py:$ARCH
if [ -n "${DOCKERFILE:-}" ]; then
  DOCKERFILE=$(cd "$ROOT" && realpath -e "$DOCKERFILE" 2>/dev/null) || { echo "DOCKERFILE: no such file" >&2; exit 2; }
elif [ "$ARCH" = arm64 ]; then
  DOCKERFILE=$ROOT/Dockerfile.arm64
else
  DOCKERFILE=$ROOT/Dockerfile
fi
FAULT=${SMOKE_FAULT:-cavitation@20}
EVENT_PATH=${SMOKE_EVENT_PATH:-auto}
EVENT_TIMEOUT=${SMOKE_EVENT_TIMEOUT:-150}
HEALTH_TIMEOUT=180
MEMORY_AFTER=60
T0=$SECONDS

say() { printf '[%4ds] %s\n' $((SECONDS - T0)) "$*"; }
die() { say "FAIL: $*" >&2; exit 1; }

if [ -n "$DRY_RUN" ]; then
  printf '%s\n' "PLATFORM=$PLATFORM" "MODE=$MODE" "DOCKERFILE=$DOCKERFILE" "IMAGE=$IMAGE" "BASE=$BASE" \
    "CACHE=$CACHE" "RUNDIR=$RUNDIR"
  exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || die "run as root (apt, binfmt_misc, debootstrap, rootful podman)"
  exec sudo -E bash "$0" "${ARGS[@]}"
fi

# ---------------------------------------------------------------- cleanup of whatever this run started
WORK=""
CTR=""
PIDS=()
cleanup() {
  local rc=$?
  set +e
  if [ -n "$CTR" ]; then podman rm -f -t 5 "$CTR" >/dev/null 2>&1; fi
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null; done
  if [ -n "$WORK" ]; then
    if [ "${SMOKE_KEEP:-0}" = 1 ] || [ $rc -ne 0 ]; then say "logs kept in $WORK"; else rm -rf "$WORK"; fi
  fi
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- host packages
ensure_packages() {
  local need=() p
  command -v podman >/dev/null || need+=(podman)
  command -v runc >/dev/null || need+=(runc)
  command -v debootstrap >/dev/null || need+=(debootstrap)
  command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
  command -v mosquitto_sub >/dev/null || need+=(mosquitto-clients)
  for p in ca-certificates; do dpkg -s "$p" >/dev/null 2>&1 || need+=("$p"); done
  [ ${#need[@]} -eq 0 ] && return
  say "installing with apt: ${need[*]}"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
}

# ---------------------------------------------------------------- qemu 10 for aarch64 binaries
QEMU=$CACHE/qemu/qemu-aarch64-static
BINFMT=/proc/sys/fs/binfmt_misc
ensure_qemu() {
  if [ ! -x "$QEMU" ]; then
    say "fetching qemu-user (static, 10.x) from bookworm-backports"
    local d=$CACHE/qemu/apt mirror
    mirror=$(debian_mirror)
    mkdir -p "$d"/lists/partial "$d"/archives/partial "$d"/sources.list.d "$d"/preferences.d
    echo "deb $mirror bookworm-backports main" >"$d/sources.list"
    local apt_opts=(-o "Dir::Etc::SourceList=$d/sources.list" -o "Dir::Etc::SourceParts=$d/sources.list.d"
      -o "Dir::Etc::PreferencesParts=$d/preferences.d" -o "Dir::State::Lists=$d/lists" -o "Dir::Cache=$d"
      -o "APT::Sandbox::User=root")
    apt-get "${apt_opts[@]}" update -qq >/dev/null
    # in backports qemu-user-static is a transitional package; the static binaries are in qemu-user
    (cd "$d" && rm -f qemu-user_*.deb && apt-get "${apt_opts[@]}" download -qq qemu-user/bookworm-backports >/dev/null)
    dpkg-deb --fsys-tarfile "$d"/qemu-user_*.deb | tar -C "$d" -x ./usr/bin/qemu-aarch64
    mv "$d/usr/bin/qemu-aarch64" "$QEMU"
    rm -rf "$d"/usr "$d"/qemu-user_*.deb "$d"/archives
  fi
  mountpoint -q "$BINFMT" || mount -t binfmt_misc binfmt_misc "$BINFMT"
  if [ -e "$BINFMT/qemu-aarch64" ]; then
    local interp ver
    interp=$(sed -n 's/^interpreter //p' "$BINFMT/qemu-aarch64")
    ver=$("$interp" --version 2>/dev/null | sed -n 's/^qemu-aarch64 version \([0-9]*\).*/\1/p' || true)
    if grep -qx enabled "$BINFMT/qemu-aarch64" && [ "${ver:-0}" -ge 10 ] && grep -q "flags: .*F" "$BINFMT/qemu-aarch64"; then
      return
    fi
    say "replacing the aarch64 binfmt handler ($interp, qemu ${ver:-?}) with qemu 10"
    echo -1 >"$BINFMT/qemu-aarch64"
  fi
  # magic and mask of an aarch64 ELF (qemu's binfmt.d/qemu-aarch64.conf); F: the kernel keeps the binary
  # open, so it works inside containers and chroots; P: argv[0] is kept
  printf '%s' ':qemu-aarch64:M::\x7f\x45\x4c\x46\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00:\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff:'"$QEMU"':FP' \
    >"$BINFMT/register"
  say "registered $("$QEMU" --version | head -1) for aarch64 binaries"
}

debian_mirror() {
  local m=""
  if [ -r /etc/apt/sources.list.d/debian.sources ]; then
    m=$(awk '/^URIs:/ && !/security/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources)
  fi
  if [ -z "$m" ] && [ -r /etc/apt/sources.list ]; then
    m=$(awk '$1 == "deb" && $3 ~ /^bookworm$/ {print $2; exit}' /etc/apt/sources.list)
  fi
  echo "${m:-http://deb.debian.org/debian}"
}

# ---------------------------------------------------------------- podman with its own config and storage
setup_podman() {
  local hn hu
  hn=$(ulimit -Hn)
  hu=$(ulimit -Hu)
  [ "$hn" = unlimited ] && hn=1048576
  # nproc: even the shell's own hard limit (96365 on the reference VM) was refused; 16384 is accepted
  # and is plenty (it counts the threads of the container's user)
  if [ "$hu" = unlimited ] || [ "$hu" -gt 16384 ]; then hu=16384; fi
  mkdir -p "$CACHE/containers" "$CACHE/storage" "$RUNDIR"
  # runc (crun 1.8 rejects this VM's cgroup setup), cgroupfs, host network, and ulimits the VM allows:
  # rootful podman raises nofile and nproc far above them by default, and the container fails to start
  cat >"$CACHE/containers/containers.conf" <<EOF
[containers]
netns = "host"
default_ulimits = ["nofile=$hn:$hn", "nproc=$hu:$hu"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "$RUNDIR/events.log"
tmp_dir = "$RUNDIR/libpod"
EOF
  cat >"$CACHE/containers/storage.conf" <<EOF
[storage]
driver = "overlay"
graphroot = "$CACHE/storage"
runroot = "$RUNDIR/storage"
EOF
  export CONTAINERS_CONF=$CACHE/containers/containers.conf
  export CONTAINERS_STORAGE_CONF=$CACHE/containers/storage.conf
}

# ---------------------------------------------------------------- the stand-in base image
ensure_base() {
  if podman image exists "$BASE"; then return; fi
  local rootfs=$CACHE/rootfs
  if [ ! -e "$rootfs/.complete" ]; then
    local mirror
    mirror=$(debian_mirror)
    say "debootstrap $ARCH bookworm (minbase + python3) from $mirror ($MODE: $([ "$MODE" = native ] && echo 1-2 || echo 3-8) min)"
    unmount_under "$rootfs"
    rm -rf --one-file-system "$rootfs"
    mkdir -p "$CACHE/debs"
    # no python3-pip: the Dockerfile installs into a venv (ensurepip comes with python3-venv), and every
    # package left out is one less set of maintainer scripts to run (under emulation: slowly)
    nice -n 10 debootstrap --arch="$ARCH" --variant=minbase --cache-dir="$CACHE/debs" \
      --include=python3,python3-venv,python-is-python3,ca-certificates \
      bookworm "$rootfs" "$mirror" >"$CACHE/debootstrap.log" 2>&1 \
      || { unmount_under "$rootfs"; tail -20 "$CACHE/debootstrap.log" >&2; die "debootstrap failed (log: $CACHE/debootstrap.log)"; }
    unmount_under "$rootfs"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    touch "$rootfs/.complete"
  fi
  # This machine's own CAs (it inspects outgoing HTTPS), so pip inside the build reaches PyPI. They go
  # into the local stand-in only; the real python:3.11-slim-bookworm build needs nothing of the sort.
  local crt
  for crt in /usr/local/share/ca-certificates/*.crt; do
    [ -e "$crt" ] && cp "$crt" "$rootfs/usr/local/share/ca-certificates/"
  done
  chroot "$rootfs" update-ca-certificates >/dev/null 2>&1 || die "update-ca-certificates in the $ARCH rootfs failed"
  say "importing the stand-in base as $BASE"
  tar -C "$rootfs" --exclude=./.complete -c . | podman import -q --arch "$ARCH" --os linux - "$BASE" >/dev/null
}

# An interrupted debootstrap can leave proc/sys mounted in the rootfs: never delete through a mount.
unmount_under() {
  local m
  findmnt -rn -o TARGET | { grep -F "$1/" || true; } | sort -r | while read -r m; do umount -l "$m" || true; done
}

# ---------------------------------------------------------------- helpers
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

wait_port() {  # port seconds
  python3 - "$1" "$2" <<'EOF'
import socket, sys, time
port, deadline = int(sys.argv[1]), time.monotonic() + float(sys.argv[2])
while time.monotonic() < deadline:
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", port)) == 0:
            sys.exit(0)
    time.sleep(0.2)
sys.exit(1)
EOF
}

http_get() {  # url -> prints "STATUS BODY"
  python3 - "$1" <<'EOF'
import sys, urllib.error, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=5) as r:
        print(r.status, r.read().decode(errors="replace")[:300])
except urllib.error.HTTPError as e:
    print(e.code, e.read().decode(errors="replace")[:300])
except OSError as e:
    print(0, e)
EOF
}

ctr_running() { [ "$(podman inspect -f '{{.State.Running}}' "$CTR" 2>/dev/null)" = true ]; }

human() { numfmt --to=iec-i --suffix=B "$1" 2>/dev/null || echo "$1 B"; }

# ---------------------------------------------------------------- 1. tools, emulator, podman, base
ensure_packages
mkdir -p "$CACHE"
if [ "$MODE" = emulated ]; then ensure_qemu; fi
setup_podman
ensure_base

# ---------------------------------------------------------------- 2. build
say "building $IMAGE for $PLATFORM ($MODE) from ${DOCKERFILE#"$ROOT"/}"
build_log=$CACHE/build.log
t_build=$SECONDS
old_id=$(podman image inspect -f '{{.Id}}' "$IMAGE" 2>/dev/null || true)
if ! nice -n 10 podman build --platform "$PLATFORM" --format docker --network host --pull=never \
    --build-arg BASE_IMAGE="$BASE" -f "$DOCKERFILE" -t "$IMAGE" "$ROOT" >"$build_log" 2>&1; then
  tail -30 "$build_log" >&2
  die "podman build failed (log: $build_log)"
fi
say "built in $((SECONDS - t_build)) s"
new_id=$(podman image inspect -f '{{.Id}}' "$IMAGE")
if [ -n "$old_id" ] && [ "$old_id" != "$new_id" ]; then  # keep the cache from growing with every rebuild
  podman rmi "$old_id" >/dev/null 2>&1 || true
fi
# builder-stage images of older dependency sets: the newest stay as layer cache
podman image prune -f --filter until=168h >/dev/null 2>&1 || true
arch=$(podman image inspect -f '{{.Architecture}}' "$IMAGE")
[ "$arch" = "$ARCH" ] || die "image architecture is $arch, not $ARCH"
size=$(podman image inspect -f '{{.Size}}' "$IMAGE")
base_size=$(podman image inspect -f '{{.Size}}' "$BASE")

# ---------------------------------------------------------------- 3. broker, subscriber, container
WORK=$(mktemp -d /tmp/edge-agent-smoke.XXXXXX)
chmod 0755 "$WORK"
MQTT_PORT=$(free_port)
OBS_PORT=$(free_port)
MB_PORT=$(free_port)
UA_PORT=$(free_port)
S7_PORT=$(free_port)
AGENT_ID=smoke-$$
PREFIX=smoke/$AGENT_ID
MQTT_USER=edge-agent
MQTT_PASS=$(python3 -c 'import secrets; print(secrets.token_urlsafe(18))')

printf '%s\n' "$MQTT_PASS" >"$WORK/mqtt_password"
chmod 0444 "$WORK/mqtt_password"   # read by the container's uid 10001
mosquitto_passwd -b -c "$WORK/passwd" "$MQTT_USER" "$MQTT_PASS" >/dev/null 2>&1
cat >"$WORK/mosquitto.conf" <<EOF
listener $MQTT_PORT 127.0.0.1
allow_anonymous false
password_file $WORK/passwd
persistence false
user root
log_dest file $WORK/mosquitto.log
EOF
MOSQUITTO=$(command -v mosquitto || echo /usr/sbin/mosquitto)
"$MOSQUITTO" -c "$WORK/mosquitto.conf" >/dev/null 2>&1 &
PIDS+=($!)
wait_port "$MQTT_PORT" 10 || die "mosquitto did not start (log: $WORK/mosquitto.log)"
say "mosquitto on 127.0.0.1:$MQTT_PORT (password auth)"

# Everything the image's agent does with MQTT, retained status included.
mosquitto_sub -h 127.0.0.1 -p "$MQTT_PORT" -u "$MQTT_USER" -P "$MQTT_PASS" -q 1 -v -t "$PREFIX/#" \
  >"$WORK/subscriber.log" 2>&1 &
PIDS+=($!)

if [ "$EVENT_PATH" = auto ]; then
  # does the image's agent wire the MQTT publisher into `run`? (exit 0 yes, 1 no, anything else: broken)
  probe_rc=0
  podman run --rm --platform "$PLATFORM" --no-healthcheck --entrypoint /bin/sh "$IMAGE" -c \
    'grep -q MqttPublisher /opt/venv/lib/python3*/site-packages/edge_agent/agent.py' >"$WORK/probe.log" 2>&1 \
    || probe_rc=$?
  case $probe_rc in
    0) EVENT_PATH=mqtt ;;
    1) EVENT_PATH=stdout ;;
    *) cat "$WORK/probe.log" >&2; die "cannot run the image (exit $probe_rc)" ;;
  esac
fi
# mqtt: the sample config as it is, broker and topics from the environment. stdout: the same config
# without its mqtt: section, where the agent prints events on stdout (the only way before MQTT landed).
CONFIG=$ROOT/deploy/config/edge-agent.yaml
MQTT_ENV=(-e EDGE_AGENT__MQTT__URL="mqtt://127.0.0.1:$MQTT_PORT" -e EDGE_AGENT__MQTT__TOPIC_PREFIX="$PREFIX")
case $EVENT_PATH in
  mqtt) say "success check: anomaly.start on $PREFIX/events/# (the image's agent publishes to MQTT)" ;;
  stdout)
    say "success check: anomaly.start as a JSON line on the container's stdout (config without mqtt:)"
    awk '/^mqtt:/ {skip = 1; next} /^[^[:space:]#]/ {skip = 0} !skip' "$CONFIG" >"$WORK/config.yaml"
    chmod 0644 "$WORK/config.yaml"
    CONFIG=$WORK/config.yaml
    MQTT_ENV=()   # an EDGE_AGENT__MQTT__* override would bring the section back
    ;;
  *) die "SMOKE_EVENT_PATH must be auto, mqtt or stdout" ;;
esac

mkdir -p "$WORK/state" && chown 10001:10001 "$WORK/state"
CTR=edge-agent-smoke-$$
# --health-interval disable: no systemd timer for the HEALTHCHECK (no systemd here); it is run below by hand
podman run -d --name "$CTR" --platform "$PLATFORM" --network host --health-interval disable \
  --read-only --tmpfs /tmp:rw,size=64m,mode=1777 \
  --cap-drop ALL --security-opt no-new-privileges \
  -v "$CONFIG:/etc/edge-agent/config.yaml:ro" \
  -v "$WORK/mqtt_password:/run/secrets/mqtt_password:ro" \
  -v "$WORK/state:/var/lib/edge-agent:rw" \
  -e SIM_HOST=127.0.0.1 -e SIM_MODBUS_PORT="$MB_PORT" -e SIM_OPCUA_PORT="$UA_PORT" -e SIM_S7_PORT="$S7_PORT" \
  -e MQTT_USERNAME="$MQTT_USER" \
  -e EDGE_AGENT__AGENT__ID="$AGENT_ID" \
  "${MQTT_ENV[@]}" \
  -e EDGE_AGENT__OBSERVE__LISTEN="127.0.0.1:$OBS_PORT" \
  "$IMAGE" >"$WORK/run.log" 2>&1 || { cat "$WORK/run.log" >&2; CTR_FAILED=1; }
[ -z "${CTR_FAILED:-}" ] || die "podman run failed"
t_ctr=$SECONDS
say "container $CTR started (observe on 127.0.0.1:$OBS_PORT)"

# ---------------------------------------------------------------- 4. health, then the plant with its fault
health=""
while [ $((SECONDS - t_ctr)) -lt $HEALTH_TIMEOUT ]; do
  if ! ctr_running; then
    podman logs "$CTR" 2>&1 | tail -30 >&2
    die "the container exited ($(podman inspect -f '{{.State.ExitCode}}' "$CTR"))"
  fi
  health=$(http_get "http://127.0.0.1:$OBS_PORT/healthz")
  [ "${health%% *}" = 200 ] && break
  sleep 2
done
[ "${health%% *}" = 200 ] || { podman logs "$CTR" 2>&1 | tail -30 >&2; die "no /healthz 200 within ${HEALTH_TIMEOUT}s"; }
say "/healthz answered 200 after $((SECONDS - t_ctr)) s ($MODE start)"
# the image's own rule: unhealthy after 3 failures in a row (--retries=3); under emulation on a busy
# machine one run of its python can pass the 5 s timeout, which an engine would retry too
hc_ok=""
for attempt in 1 2 3; do
  if hc=$(podman healthcheck run "$CTR" 2>&1); then hc_ok=1; break; fi
  say "image HEALTHCHECK attempt $attempt failed: $hc"
  sleep 2
done
[ -n "$hc_ok" ] || die "image HEALTHCHECK failed 3 times in a row: $hc"
say "image HEALTHCHECK: ${hc:-healthy}"

VENV_EA=$ROOT/.venv/bin/edge-agent
if [ ! -x "$VENV_EA" ]; then
  say "setting up $ROOT/.venv for the simulator"
  python3 -m venv "$ROOT/.venv"
  "$ROOT/.venv/bin/python" -m pip install -q --disable-pip-version-check -e "$ROOT" >/dev/null
fi
"$VENV_EA" simulate --host 127.0.0.1 --modbus-port "$MB_PORT" --opcua-port "$UA_PORT" --s7-port "$S7_PORT" \
  --opcua-cert-dir "$WORK/simulator-pki" --fault "$FAULT" >"$WORK/simulator.log" 2>&1 &
PIDS+=($!)
t_sim=$SECONDS
say "simulator on 127.0.0.1 (Modbus :$MB_PORT, OPC UA :$UA_PORT, S7 :$S7_PORT), fault $FAULT"

# ---------------------------------------------------------------- 5. the event
find_event() {  # prints the anomaly.start event's JSON, if it arrived
  if [ "$EVENT_PATH" = mqtt ]; then
    grep -F "$PREFIX/events/" "$WORK/subscriber.log" | cut -d' ' -f2-
  else
    podman logs "$CTR" 2>/dev/null
  fi | python3 -c '
import json, sys
for line in sys.stdin:
    line = line.strip()
    if line.startswith("{"):
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if isinstance(e, dict) and e.get("type") == "anomaly.start":
            print(json.dumps(e)); break'
}

event=""
while [ $((SECONDS - t_sim)) -lt "$EVENT_TIMEOUT" ]; do
  ctr_running || { podman logs "$CTR" 2>&1 | tail -30 >&2; die "the container exited"; }
  event=$(find_event || true)
  [ -n "$event" ] && break
  sleep 2
done
if [ -n "$event" ]; then
  say "anomaly.start arrived via $EVENT_PATH $((SECONDS - t_sim)) s after the simulator started:"
  python3 -c '
import json, sys
e = json.loads(sys.argv[1])
c = e.get("contributions") or []
top = ", ".join("%s %.0f%%" % (x.get("tag"), 100 * (x.get("share") or 0)) for x in c[:3]) if isinstance(c, list) else c
model, sev, score, thr = (e.get(k) for k in ("model", "severity", "score", "threshold"))
model = model.get("name") if isinstance(model, dict) else model
print(f"         model {model} severity {sev} score {score} threshold {thr}; top {top}")
' "$event" || true
else
  say "no anomaly.start within ${EVENT_TIMEOUT}s of the simulator's start; the container's last lines:"
  podman logs "$CTR" 2>&1 | tail -20
fi
ready=$(http_get "http://127.0.0.1:$OBS_PORT/readyz")
say "/readyz: $ready"
if [ "$EVENT_PATH" = mqtt ]; then
  status=$(grep -F "$PREFIX/status " "$WORK/subscriber.log" | tail -1 | cut -c1-200 || true)
  say "retained status: ${status:-none seen}"
fi

# ---------------------------------------------------------------- 6. size and memory after a minute
while [ $((SECONDS - t_ctr)) -lt $MEMORY_AFTER ]; do sleep 2; done
mem=$(podman stats --no-stream --format '{{.MemUsage}}' "$CTR" 2>/dev/null || echo "n/a")
pid=$(podman inspect -f '{{.State.Pid}}' "$CTR")
rss_kb=$(awk '/^VmRSS/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)
say "image $IMAGE: $(human "$size") ($(human $((size - base_size))) on top of the $(human "$base_size") stand-in base)"
rss_note=""
[ "$MODE" = emulated ] && rss_note=" (under qemu-user: includes the emulator's translation cache)"
say "container memory after $((SECONDS - t_ctr)) s: cgroup ${mem}; agent process RSS $((rss_kb / 1024)) MiB$rss_note"

if [ -z "$event" ]; then die "the anomaly event did not arrive"; fi
say "OK: the $PLATFORM image ($MODE) builds, starts read-only as uid 10001, passes its health check and reports the injected fault"
