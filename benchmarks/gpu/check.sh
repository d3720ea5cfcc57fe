#!/usr/bin/env bash
# The prepared GPU check of issue 8: one call on a lent GPU machine (an H100/H200 with its own torch,
# transformers and peft, no network), under 10 minutes (phase limits add up to 550 s; issue 12 took 15 s
# from the tests' limit and 15 s from the training's for its packed-training phase). It runs
#   1. the GPU tests            pytest -m requires_gpu (tests/test_gpu.py)
#   2. the engine benchmark     benchmarks/bench_engine.py --device cuda (SmolLM2-135M-shaped decoder)
#   3. Track A-shaped training  benchmarks/gpu/train_track_a.py: 2,000 steps in bf16 and in fp32 + answers/s
#   4. packed training          benchmarks/bench_pack.py: job-steps/s of K = 1..16 jobs over one decoder vs
#                               solo runs (issue 12's target: 8 packed >= 5x 8 solo in sequence), fp32 then
#                               bf16 while its budget lasts
#   5. the demo on the GPU      xares-eval demo --device cuda, fp32 and bf16, scores compared with the CPU's
# and writes $OUT/gpu-check.json (every figure) and $OUT/check.log (every phase's output).
#
# Prepare on the CPU machine first (wheels the GPU image lacks, the demo's inputs and CPU scores):
#   bash benchmarks/gpu/prepare.sh
# then, through the device tool:  run  command="bash benchmarks/gpu/check.sh"  carry=[".whl", ".gpu-demo"]
# Anywhere else (a GPU box of your own): OUT=/tmp/gpu-check bash benchmarks/gpu/check.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-$PWD/gpu-check-out}"
mkdir -p "$OUT"
WORK="$(mktemp -d)"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=PASSIVE
PY="${PYTHON:-python3}"
LOG="$OUT/check.log"
: > "$LOG"

if ! $PY -c "import jsonschema, jiwer, soundfile, soxr, docker" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >> "$LOG" 2>&1 || { echo "installing the carried wheels failed (see $LOG)"; exit 1; }
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "torch sees no CUDA device here: this check needs a GPU" | tee -a "$LOG"
  exit 3
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv >> "$LOG" 2>&1

phase() {  # phase NAME SECONDS COMMAND...: run with a time limit, log, record rc and duration
  local name=$1 limit=$2; shift 2
  local t0; t0=$(date +%s)
  echo "== $name (limit ${limit}s): $*" | tee -a "$LOG"
  timeout "$limit" "$@" >> "$LOG" 2>&1
  local rc=$?
  local dt=$(( $(date +%s) - t0 ))
  echo "== $name: rc=$rc in ${dt}s" | tee -a "$LOG"
  echo "{\"phase\": \"$name\", \"rc\": $rc, \"seconds\": $dt, \"limit\": $limit}" >> "$WORK/phases.jsonl"
}

phase tests 100 $PY -m pytest -q -p no:cacheprovider -m requires_gpu tests/test_gpu.py --junitxml "$WORK/tests.xml"
phase engine 95 $PY benchmarks/bench_engine.py --device cuda --quick --decoders smollm2 --json "$WORK/engine.json"
phase train 150 $PY benchmarks/gpu/train_track_a.py --device cuda --steps 2000 --json "$WORK/train.json"
# K=8 (the target) first; each run writes pack.json when done, so a cut phase keeps the runs before it;
# no new run starts after 75 s
phase pack 100 $PY benchmarks/bench_pack.py --device cuda --packs 8,1,2,4,16 --precision fp32,bf16 \
  --steps 30 --warmup 5 --budget-s 75 --json "$WORK/pack.json"
if [ -d .gpu-demo ]; then  # the CPU's inputs and features; new decoders (keys hold the precision, not the device)
  phase demo-fp32 60 $PY -m evaluator demo --out .gpu-demo --device cuda --precision fp32 --quiet
  phase demo-bf16 45 $PY -m evaluator demo --out .gpu-demo --device cuda --precision bf16 --quiet
fi
$PY benchmarks/gpu/summarize.py "$WORK" .gpu-demo > "$OUT/gpu-check.json" 2>> "$LOG"
cat "$OUT/gpu-check.json"
grep "^issue 12" "$LOG" || true
