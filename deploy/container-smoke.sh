#!/usr/bin/env bash
# Build the coordinator and hospital images and run a smoke federation in containers: the
# coordinator (init, add-site, start, run) and three hospitals, each container holding only what
# that party would have (a hospital: its own bundle and its own data, read-only, and a cache of its
# own), on the host network and 127.0.0.1. Ends with the run's metrics checked and every container
# it started removed. From the repository root:
#
#   deploy/container-smoke.sh                       # docker or podman, images from python:3.11-slim
#
# What a build machine without the public registries needs goes in as arguments, never into the
# Dockerfiles (this project's own CI-like machines, for example):
#
#   deploy/container-smoke.sh --base localhost/ccmr-base-bookworm --torch-index "" \
#       --pip-extra "--find-links /wheels" --build-mount /opt/wheels:/wheels:ro \
#       --build-mount /etc/ssl/certs:/etc/ssl/certs:ro
#
# A base image made without a registry: debootstrap --variant=minbase
# --include=python3,python3-venv,python3-pip,ca-certificates bookworm DIR MIRROR, then
# tar -C DIR -c . | podman import - ccmr-base-bookworm.
#
# Options: --engine docker|podman (default: podman if present), --no-build (use the images as they
# are), --keep (leave the work folder for a look), --rounds N (default 2).
set -euo pipefail

ENGINE=""
BASE=""
TORCH_INDEX="__default__"
PIP_EXTRA=""
BUILD_MOUNTS=()
BUILD=1
KEEP=0
ROUNDS=2
while [ $# -gt 0 ]; do
  case "$1" in
    --engine) ENGINE="$2"; shift 2 ;;
    --base) BASE="$2"; shift 2 ;;
    --torch-index) TORCH_INDEX="$2"; shift 2 ;;
    --pip-extra) PIP_EXTRA="$2"; shift 2 ;;
    --build-mount) BUILD_MOUNTS+=(-v "$2"); shift 2 ;;
    --no-build) BUILD=0; shift ;;
    --keep) KEEP=1; shift ;;
    --rounds) ROUNDS="$2"; shift 2 ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [ -z "$ENGINE" ]; then
  if command -v podman >/dev/null; then ENGINE=podman; elif command -v docker >/dev/null; then ENGINE=docker; else
    echo "error: neither podman nor docker is installed" >&2; exit 2; fi
fi
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
T0=$(date +%s)
say() { echo "[$(( $(date +%s) - T0 )) s] $*"; }

# podman here: runc (crun cannot set these limits on this kind of machine), chroot isolation for builds
RUN_FLAGS=(--network host)
BUILD_FLAGS=(--network host)
if [ "$ENGINE" = podman ]; then
  command -v runc >/dev/null && RUN_FLAGS=(--runtime runc "${RUN_FLAGS[@]}")
  RUN_FLAGS+=(--ulimit nofile=1024:1024 --ulimit nproc=1024:1024)
  BUILD_FLAGS+=(--isolation chroot)
fi

if [ "$BUILD" = 1 ]; then
  ARGS=()
  [ -n "$BASE" ] && ARGS+=(--build-arg "BASE=$BASE")
  [ "$TORCH_INDEX" != "__default__" ] && ARGS+=(--build-arg "TORCH_INDEX=$TORCH_INDEX")
  [ -n "$PIP_EXTRA" ] && ARGS+=(--build-arg "PIP_EXTRA=$PIP_EXTRA")
  for image in server client; do
    say "building ccmr-$image"
    $ENGINE build "${BUILD_FLAGS[@]}" "${BUILD_MOUNTS[@]}" "${ARGS[@]}" -f "deploy/Dockerfile.$image" \
      -t "ccmr-$image" . > "/tmp/ccmr-build-$image.log" 2>&1 \
      || { tail -30 "/tmp/ccmr-build-$image.log"; echo "error: building ccmr-$image failed (log above)" >&2; exit 1; }
  done
  say "built: $($ENGINE images --format '{{.Repository}} {{.Size}}' | grep -E 'ccmr-(server|client)' | tr '\n' ' ')"
fi

WORK="$(mktemp -d /tmp/ccmr-containers-XXXXXX)"
NAME="ccmr-smoke-$$"
STARTED=()
cleanup() {
  for c in "${STARTED[@]}"; do $ENGINE rm -f -t 20 "$c" >/dev/null 2>&1 || $ENGINE rm -f "$c" >/dev/null 2>&1 || true; done
  if [ "$KEEP" = 1 ]; then echo "work folder kept: $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
UID_IN=10001  # the images' non-root user

# the coordinator's folder (CA key, registry, runs) and each hospital's own folders
mkdir -p "$WORK/federation" "$WORK/cohort"
for s in a b c; do mkdir -p "$WORK/cache-$s"; done
chown -R "$UID_IN" "$WORK" 2>/dev/null || chmod -R a+rwX "$WORK"

say "synthetic cohort (3 sites, 30 patients) for the demo"
$ENGINE run --rm "${RUN_FLAGS[@]}" -v "$WORK/cohort:/cohort" --entrypoint ccmr ccmr-server \
  synth --out /cohort/demo --sites 3 --patients 30 --quiet

PORT=$(free_port)
say "coordinator: init, add-site x3 (port $PORT on 127.0.0.1)"
coord() { $ENGINE run --rm "${RUN_FLAGS[@]}" -v "$WORK/federation:/federation" ccmr-server "$@"; }
coord init /federation/fed --host localhost --port "$PORT" --listen-host 127.0.0.1 > /dev/null
for s in a b c; do coord add-site /federation/fed "hospital-$s" > /dev/null; done

say "coordinator: start (SuperLink)"
$ENGINE run -d --name "$NAME-superlink" "${RUN_FLAGS[@]}" -v "$WORK/federation:/federation" ccmr-server \
  start /federation/fed > /dev/null
STARTED+=("$NAME-superlink")
# the hospitals may dial once the SuperLink has registered their keys (it says so in its log)
for i in $(seq 1 120); do
  $ENGINE logs "$NAME-superlink" 2>&1 | grep -q "sites: hospital-a, hospital-b, hospital-c" && break
  [ "$($ENGINE inspect -f '{{.State.Running}}' "$NAME-superlink")" = true ] || break
  sleep 1
done
$ENGINE logs "$NAME-superlink" 2>&1 | grep -q "sites: hospital-a, hospital-b, hospital-c" \
  || { $ENGINE logs --tail 30 "$NAME-superlink"; echo "error: the SuperLink did not start" >&2; exit 1; }

for s in a b c; do
  # a hospital sees its own bundle and its own data (read-only) and its cache; nothing else
  $ENGINE run -d --name "$NAME-hospital-$s" "${RUN_FLAGS[@]}" \
    -v "$WORK/federation/fed/bundles/hospital-$s:/bundle:ro" -v "$WORK/cohort/demo/site-$s:/data:ro" \
    -v "$WORK/cache-$s:/cache" ccmr-client \
    start --bundle /bundle --data /data --port "$(free_port)" --min-eval-patients 1 > /dev/null
  STARTED+=("$NAME-hospital-$s")
done

say "waiting for three hospitals online"
for i in $(seq 1 40); do
  n=$($ENGINE exec "$NAME-superlink" ccmr-server status /federation/fed 2>/dev/null | grep -c " online" || true)
  [ "$n" -ge 3 ] && break
  for s in a b c; do  # a hospital that stopped will not come online: say why now
    [ "$($ENGINE inspect -f '{{.State.Running}}' "$NAME-hospital-$s")" = true ] || i=1000
  done
  [ "$i" = 1000 ] && break
  sleep 2
done
if [ "${n:-0}" -lt 3 ]; then
  $ENGINE exec "$NAME-superlink" ccmr-server status /federation/fed || true
  for s in a b c; do echo "--- hospital-$s"; $ENGINE logs --tail 20 "$NAME-hospital-$s"; done
  echo "error: only ${n:-0} of 3 hospitals came online" >&2; exit 1
fi

say "run: smoke preset, $ROUNDS rounds, every hospital"
if ! $ENGINE exec "$NAME-superlink" ccmr-server run /federation/fed --preset smoke --rounds "$ROUNDS" \
    --min-sites 3 --out /federation/runs/smoke --set validation-patients=0 --set round-timeout=180 --no-follow; then
  for s in a b c; do echo "--- hospital-$s"; $ENGINE logs --tail 30 "$NAME-hospital-$s"; done
  echo "error: the federated run failed" >&2; exit 1
fi

python3 - "$WORK/federation/runs/smoke" "$ROUNDS" <<'EOF'
import json, sys
from pathlib import Path
run, rounds = Path(sys.argv[1]), int(sys.argv[2])
m = json.loads((run / "metrics.json").read_text())
done = [json.loads(x)["round"] for x in (run / "metrics.jsonl").read_text().splitlines()]
t = m["test"]
assert done == list(range(1, rounds + 1)), f"rounds recorded: {done}"
assert m["sites"] == ["hospital-a", "hospital-b", "hospital-c"] and t["n"] > 0, m
assert all(n > 0 for n in t["site_n"]), f"a hospital sent no test statistics: {t['site_n']}"
assert (run / "model.pt").is_file() and (run / "report.html").is_file()
print(f"metrics checked: {rounds} rounds, {t['n']} test patients over 3 hospitals, accuracy {t['accuracy']:.3f} "
      f"(a smoke run: the number says the pipeline works, not how good the model is)")
EOF
for s in a b c; do
  # what left each hospital is in its own audit log, in its own cache
  test -s "$WORK/cache-$s/audit/hospital-$s.jsonl" || { echo "error: hospital-$s wrote no audit log" >&2; exit 1; }
done
say "done: containers in ${SECONDS} s of this script; every container it started is removed on exit"
