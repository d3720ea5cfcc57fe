#!/usr/bin/env bash
# Make a Docker engine and the xares/encoder-base image ready (CI, `make docker-ready`, `make base-image`).
#
#   bash docker/ci-docker.sh            # install docker.io if missing, start dockerd if none answers,
#                                       # build xares/encoder-base if missing
#   bash docker/ci-docker.sh --force    # also rebuild the base image
#
# Starting dockerd needs root; on a workstation where an engine already runs this only checks it.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { echo "ci-docker: $*"; }
die() { echo "ci-docker: $*" >&2; exit 1; }
as_root() { if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo -n "$@"; fi; }

if ! command -v docker >/dev/null 2>&1 || ! command -v dockerd >/dev/null 2>&1; then
  log "installing docker.io"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io >/dev/null
fi

if ! docker info >/dev/null 2>&1; then
  log "no Docker engine answers: starting dockerd in the background (log: /tmp/dockerd.log)"
  # The daemon must outlive this script (the tests use it), hence nohup + setsid.
  as_root setsid nohup dockerd >/tmp/dockerd.log 2>&1 < /dev/null &
  for _ in $(seq 1 60); do
    docker info >/dev/null 2>&1 && break
    sleep 1
  done
  docker info >/dev/null 2>&1 || { tail -n 20 /tmp/dockerd.log >&2 || true; die "dockerd did not answer within 60 s"; }
fi
log "Docker engine $(docker version -f '{{.Server.Version}}') is up"

as_root bash docker/build-base-image.sh "$@"
