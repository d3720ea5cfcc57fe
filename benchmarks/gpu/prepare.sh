#!/usr/bin/env bash
# Prepare, on the CPU machine, what benchmarks/gpu/check.sh needs on a GPU machine that has no network:
#   .whl/       wheels (CPython 3.12, manylinux x86-64) of the packages its image lacks
#   .gpu-demo/  the demo's submission, data, smoke-test decoder and feature store, and the CPU's scores
# Both are git-ignored; the device call carries them:  run bash benchmarks/gpu/check.sh, carry [.whl, .gpu-demo]
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${VENV:-.venv}
PY3=${PYTHON:-python3}

# 1. wheels: our dependencies that the GPU image does not ship (it has torch, transformers, peft, onnx,
#    onnxruntime, click, rich, pyyaml, scikit-learn, safetensors, pytest; see the device tool's KINDS.md)
WHEELS="jsonschema==4.26.0 jsonschema-specifications referencing==0.37.0 rpds-py jiwer==4.0.0 rapidfuzz
        soundfile==0.14.0 cffi pycparser soxr docker==7.2.0"
rm -rf .whl && mkdir -p .whl
for w in $WHEELS; do
  $PY3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$w"
done

# 2. the demo as the CPU ran it (make demo): scores to compare with, and inputs without the trained decoders
if ! ls demo_out/runs/*/demo-a-*/results.json >/dev/null 2>&1 || ! ls demo_out/runs/*/demo-b-*/results.json >/dev/null 2>&1; then
  "$VENV/bin/xares-eval" demo --out demo_out --device cpu --quiet
fi
rm -rf .gpu-demo && mkdir -p .gpu-demo/runs
cp -r demo_out/submission.tar demo_out/data demo_out/smoke-decoder .gpu-demo/
cp -r demo_out/runs/features .gpu-demo/runs/
"$VENV/bin/python" - <<'PY'
import json, pathlib
docs = [json.loads(p.read_text()) for p in sorted(pathlib.Path("demo_out/runs").glob("*/demo-*/results.json"))]
pathlib.Path(".gpu-demo/cpu-results.json").write_text(json.dumps(docs, indent=2))
PY
du -sh .whl .gpu-demo
