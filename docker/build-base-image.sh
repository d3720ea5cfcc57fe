#!/usr/bin/env bash
# Build the xares/encoder-base image without any container registry.
#
#   docker/build-base-image.sh            # reuse xares/encoder-base:latest when it exists
#   docker/build-base-image.sh --force    # rebuild it
#
# Why: the organizer's machines (and this project's CI) reach Debian's apt mirror and PyPI but no
# registry, so `FROM python:3.11-slim` cannot be pulled. Instead we debootstrap a minimal Debian
# (bookworm, minbase, python3), install numpy/onnxruntime/soundfile into it from the host with
# `pip install --target` (binary wheels for the container's Python, never built here), and
# `docker import` the tree. Online users can use docker/encoder-base.Dockerfile instead.
#
# Needs: root (debootstrap), debootstrap, a running Docker engine, python3 with pip on the host.
# Environment overrides: IMAGE, SUITE, MIRROR, PY_VERSION, BASE_PACKAGES, PIP_CERT.
set -euo pipefail

IMAGE="${IMAGE:-xares/encoder-base:latest}"
SUITE="${SUITE:-bookworm}"
MIRROR="${MIRROR:-http://deb.debian.org/debian}"
PY_VERSION="${PY_VERSION:-3.11}"  # bookworm's python3; the wheels must match it
# Same versions as the evaluator's own environment, so host and container compute alike.
BASE_PACKAGES="${BASE_PACKAGES:-numpy==2.4.6 onnxruntime==1.31.1 soundfile==0.14.0}"
CA_BUNDLE="${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}"

force=0
for arg in "$@"; do
  case "$arg" in
    --force) force=1 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "build-base-image: unknown argument '$arg' (expected --force)" >&2; exit 2 ;;
  esac
done

die() { echo "build-base-image: $*" >&2; exit 1; }

command -v docker >/dev/null || die "docker CLI not found (apt-get install docker.io)"
docker info >/dev/null 2>&1 || die "no Docker engine answers (start dockerd, or run docker/ci-docker.sh)"

if [[ $force -eq 0 ]] && docker image inspect "$IMAGE" >/dev/null 2>&1; then
  echo "build-base-image: $IMAGE already present ($(docker image inspect -f '{{.Id}}' "$IMAGE")); --force rebuilds it"
  exit 0
fi

[[ $(id -u) -eq 0 ]] || die "debootstrap needs root (run with sudo)"
command -v debootstrap >/dev/null || die "debootstrap not found (apt-get install debootstrap)"
PIP=(python3 -m pip)
"${PIP[@]}" --version >/dev/null 2>&1 || die "host python3 has no pip (apt-get install python3-pip)"
[[ -f "$CA_BUNDLE" ]] || die "CA bundle $CA_BUNDLE not found (set PIP_CERT)"

start=$(date +%s)
work="$(mktemp -d "${TMPDIR:-/tmp}/xares-base.XXXXXX")"
trap 'rm -rf --one-file-system "$work"' EXIT
rootfs="$work/rootfs"

echo "build-base-image: [1/4] debootstrap $SUITE (minbase + python3) from $MIRROR"
debootstrap --variant=minbase --include=python3,ca-certificates "$SUITE" "$rootfs" "$MIRROR" \
  >"$work/debootstrap.log" 2>&1 || { tail -n 20 "$work/debootstrap.log" >&2; die "debootstrap failed"; }

have_py="$(chroot "$rootfs" python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
[[ "$have_py" == "$PY_VERSION" ]] || die "the rootfs has Python $have_py, expected $PY_VERSION (set PY_VERSION)"

echo "build-base-image: [2/4] pip install --target (Python $PY_VERSION wheels): $BASE_PACKAGES"
site="$rootfs/usr/local/lib/python$PY_VERSION/dist-packages"  # on Debian python3's default sys.path
mkdir -p "$site"
# pip does not widen an explicit --platform, so list every glibc tag bookworm (glibc 2.36) runs.
platforms=()
for minor in $(seq 36 -1 17); do platforms+=(--platform "manylinux_2_${minor}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
# shellcheck disable=SC2086
PIP_CERT="$CA_BUNDLE" "${PIP[@]}" install --quiet --no-compile --disable-pip-version-check --root-user-action=ignore \
  --target "$site" --python-version "$PY_VERSION" --implementation cp --abi "cp${PY_VERSION/./}" \
  "${platforms[@]}" --only-binary=:all: $BASE_PACKAGES

echo "build-base-image: [3/4] trim the tree"
chroot "$rootfs" python3 -c 'import numpy, onnxruntime, soundfile; print("  numpy", numpy.__version__, "onnxruntime", onnxruntime.__version__, "soundfile", soundfile.__version__)' 2>/dev/null \
  || die "the installed packages do not import inside the rootfs"
ln -sf /usr/bin/python3 "$rootfs/usr/local/bin/python"
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/usr/share/doc/* \
  "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/* "$rootfs"/var/log/*
find "$rootfs" -name __pycache__ -prune -exec rm -rf {} +
mkdir -p "$rootfs/input" "$rootfs/output"

echo "build-base-image: [4/4] docker import -> $IMAGE"
# PATH is set here for `docker run` users; the evaluator ignores image ENV and passes its own.
tar --numeric-owner -C "$rootfs" -c . | docker import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'WORKDIR /' \
  --change 'CMD ["python3"]' \
  --message "xares encoder base: debootstrap $SUITE minbase, python $PY_VERSION, $BASE_PACKAGES" \
  - "$IMAGE" >/dev/null

id="$(docker image inspect -f '{{.Id}}' "$IMAGE")"
size="$(docker image inspect -f '{{.Size}}' "$IMAGE")"
echo "build-base-image: built $IMAGE ($id, $((size / 1048576)) MiB) in $(( $(date +%s) - start )) s"
