"""Packed training equals solo training: per-step losses of K jobs, alone and packed, SmolLM2-135M-shaped.

CI checks 12 steps (tests/test_pack.py); this runs the issue's 200 (too long for CI on two cores) and
prints the largest relative difference per job, the figure docs/benchmarks.md records::

    python benchmarks/pack_equality.py --steps 200 --jobs 2 --json pack-equality.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

from evaluator.features import ArrayDataset  # noqa: E402
from evaluator.model import ModelConfig, build_model  # noqa: E402
from evaluator.pack import DecoderPack  # noqa: E402
from evaluator.smoke_decoder import build_smollm2_shaped  # noqa: E402
from evaluator.training import PackedJob, TrainConfig, train, train_packed  # noqa: E402

ANSWERS = ["a dog barks", "rain falls on the roof", "a cat meows", "church bells", "speech"]
WIDTHS = (768, 1280, 512, 1024)  # encoder widths, one per job in turn


def _task(seed: int, dim: int, frames: int) -> ArrayDataset:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, len(ANSWERS), 64)
    arrays = [rng.normal(0, 1, (int(rng.integers(1, frames + 1)), dim)).astype(np.float32) for _ in y]
    return ArrayDataset(f"task{seed}", "Classify the sound.", arrays, [(ANSWERS[c],) for c in y])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--frames", type=int, default=8, help="longest clip, in encoder frames")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        decoder = build_smollm2_shaped(Path(tmp) / "decoder", texts=ANSWERS)
        specs = [(f"job{k}", WIDTHS[k % len(WIDTHS)], _task(k, WIDTHS[k % len(WIDTHS)], args.frames),
                  TrainConfig(max_steps=args.steps, seed=42 + k, warmup_steps=20, sort_buffer=16,
                              threads=args.threads, checkpoint_every=10**6, log_every=10**6))
                 for k in range(args.jobs)]
        t0 = time.monotonic()
        solo = []
        for name, dim, ds, cfg in specs:
            model = build_model(ModelConfig(encoder_dim=dim, decoder=str(decoder)), seed=cfg.seed)
            solo.append(train(model, [ds], [1.0], cfg, Path(tmp) / f"solo-{name}", progress=False).losses)
        t1 = time.monotonic()
        pack = DecoderPack(ModelConfig(encoder_dim=1, decoder=str(decoder)))
        jobs = [PackedJob(name, pack.add_job(ModelConfig(encoder_dim=dim, decoder=str(decoder)), seed=cfg.seed),
                          [ds], [1.0], cfg, Path(tmp) / f"packed-{name}") for name, dim, ds, cfg in specs]
        packed = train_packed(pack, jobs, progress=False)
        t2 = time.monotonic()
    report = {"steps": args.steps, "jobs": args.jobs, "decoder": "SmolLM2-135M-shaped (random weights)",
              "solo_seconds": round(t1 - t0, 1), "packed_seconds": round(t2 - t1, 1), "per_job": []}
    for (name, dim, _, _), alone, out in zip(specs, solo, packed):
        if out.error is not None:
            report["per_job"].append({"job": name, "error": str(out.error)})
            continue
        a, b = np.asarray(alone), np.asarray(out.result.losses)
        rel = np.abs(a - b) / np.abs(a)
        report["per_job"].append({"job": name, "encoder_dim": dim, "max_relative_diff": float(rel.max()),
                                  "at_step": int(rel.argmax()), "first_loss": float(a[0]), "last_loss": float(a[-1])})
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    ok = all(j.get("max_relative_diff", 1.0) < 1e-5 for j in report["per_job"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
