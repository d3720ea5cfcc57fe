#!/usr/bin/env bash
# Build the real XARES-LLM reference (github.com/xiaomi-research/xares-llm) in a virtual environment of
# its own, for benchmarks/bench_reference.py. Nothing of the reference enters this repository: it is
# installed from a temporary copy of your clone into the venv, and the clone itself is left untouched.
#
#   benchmarks/setup_reference.sh [SRC] [VENV]
#     SRC   a clone of xares-llm (default $XARES_REF_SRC or /tmp/xares-llm-src); when SRC does not exist
#           it is cloned from GitHub (needs network)
#     VENV  where to build the venv (default $XARES_REF_VENV or /tmp/xares-ref-venv); rebuilt from scratch
#
# Versions: torch is pinned ($TORCH_PIN, default torch==2.13.0, this project's CPU wheel; an unpinned
# torch pulls GBs of CUDA packages) and every other package the reference's uv.lock pins to a single
# version is pinned to it (transformers 4.57.3, peft 0.18.0, accelerate 1.12.0, webdataset 1.0.2, ...):
# the reference does not run on transformers 5 (TrainingArguments lost logging_dir). Set LOCK_PINS=0 to
# take the newest releases instead. torch, torchaudio and torchcodec are left to the resolver: the
# lock's 2.9.1 builds need a CUDA torch. On a CPU-only torch the PyPI torchaudio/torchcodec cannot load
# their native libraries; bench_reference.py works around that at run time (see benchmarks/README.md).
#
# Then:
#   .venv/bin/python benchmarks/bench_reference.py --quick --reference-python "$VENV/bin/python" --reference-src "$SRC"
set -euo pipefail

SRC=${1:-${XARES_REF_SRC:-/tmp/xares-llm-src}}
VENV=${2:-${XARES_REF_VENV:-/tmp/xares-ref-venv}}
TORCH_PIN=${TORCH_PIN:-torch==2.13.0}
LOCK_PINS=${LOCK_PINS:-1}
PYTHON=${PYTHON:-python3}
URL=https://github.com/xiaomi-research/xares-llm.git
REPO_ROOT=$(cd "$(dirname "$0")/.." && pwd)

abs() { (mkdir -p "$(dirname "$1")" && cd "$(dirname "$1")" && echo "$(pwd)/$(basename "$1")"); }
SRC=$(abs "$SRC")
VENV=$(abs "$VENV")
for d in "$SRC" "$VENV"; do
  case "$d/" in "$REPO_ROOT"/*) echo "setup_reference: $d is inside this repository; use a path outside it" >&2; exit 2 ;; esac
done

if [ ! -e "$SRC" ]; then
  echo "setup_reference: cloning $URL into $SRC"
  git clone --quiet "$URL" "$SRC"
fi
if [ ! -f "$SRC/pyproject.toml" ] || [ ! -f "$SRC/src/xares_llm/run.py" ]; then
  echo "setup_reference: $SRC is not a clone of xares-llm (no pyproject.toml / src/xares_llm/run.py)" >&2
  exit 2
fi

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
# Install from a copy: pip builds in the source folder (build/, *.egg-info), which must stay pristine.
if git -C "$SRC" rev-parse --git-dir >/dev/null 2>&1; then
  mkdir "$WORK/src-copy"
  git -C "$SRC" archive HEAD | tar -x -C "$WORK/src-copy"
  echo "setup_reference: xares-llm $(git -C "$SRC" rev-parse --short HEAD)"
else
  cp -r "$SRC" "$WORK/src-copy"
fi

echo "$TORCH_PIN" > "$WORK/constraints.txt"
if [ "$LOCK_PINS" = 1 ] && [ -f "$SRC/uv.lock" ]; then
  "$PYTHON" - "$SRC/uv.lock" >> "$WORK/constraints.txt" <<'EOF'
import collections, sys
try:
    import tomllib
except ImportError:  # python < 3.11
    sys.exit(print("setup_reference: python < 3.11 cannot read uv.lock; only torch is pinned", file=sys.stderr))
versions = collections.defaultdict(set)
for package in tomllib.load(open(sys.argv[1], "rb"))["package"]:
    versions[package["name"]].add(package["version"])
skip = {"torch", "torchaudio", "torchcodec", "triton", "xares-llm", "win32-setctime", "colorama"}
for name, v in sorted(versions.items()):
    if name not in skip and not name.startswith("nvidia-") and len(v) == 1:  # one version for every python
        print(f"{name}=={v.pop()}")
EOF
fi

rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install -q -c "$WORK/constraints.txt" --upgrade pip
"$VENV/bin/pip" install -q -c "$WORK/constraints.txt" "$TORCH_PIN"
"$VENV/bin/pip" install -q -c "$WORK/constraints.txt" "$WORK/src-copy"
cp "$WORK/constraints.txt" "$VENV/xares-ref-constraints.txt"
"$VENV/bin/pip" list 2>/dev/null | grep -i -E '^(torch|torchaudio|torchcodec|transformers|peft|accelerate|webdataset|xares-llm) ' || true
echo "setup_reference: done; constraints kept in $VENV/xares-ref-constraints.txt"
echo "  .venv/bin/python benchmarks/bench_reference.py --quick --reference-python $VENV/bin/python --reference-src $SRC"
