"""The official decoder's training at Track A's shapes: steps/s, memory and answers/s on one device.

A SmolLM2-135M-shaped decoder (random weights, built locally) trains with the protocol's settings
(batch 4, AdamW 1e-4, warm-up 200, LoRA r=8) on synthetic features shaped like Track A: clips of 1–10 s
at 25 or 50 frames/s, 768 or 1280 dims, short label answers from 15 tasks mixed by Track A's weights.
Then it answers a test set with the generation engine. Every figure goes to one JSON file::

    python benchmarks/gpu/train_track_a.py --device cuda --steps 2000 --json train.json
    python benchmarks/gpu/train_track_a.py --device cpu --steps 20 --precisions fp32   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI does, before torch loads

import numpy as np  # noqa: E402
import torch  # noqa: E402

from evaluator.compute import describe, resolve_device  # noqa: E402
from evaluator.features import ArrayDataset  # noqa: E402
from evaluator.generation import DecodingOptions, Generator  # noqa: E402
from evaluator.model import ModelConfig, build_model  # noqa: E402
from evaluator.smoke_decoder import build_smollm2_shaped  # noqa: E402
from evaluator.training import TrainConfig, train  # noqa: E402

WARMUP_STEPS = 100  # excluded from steps/s: graph capture of each length bucket happens in the first steps
# (task, prompt, answers, Track A weight): enough variety of prompts and answer lengths for real batches
TASKS = [
    ("esc50", "Classify the environmental sound.", ["dog", "rain", "clock tick", "church bells"], 0.5),
    ("speechcommands", "Classify the keyword.", ["yes", "no", "up", "down", "left", "right"], 1),
    ("fluent", "Identify the command, action, and object from the speech.",
     ["activate lights kitchen", "decrease volume none", "change language chinese"], 2),
    ("fsdkaggle", "Multi-label classification for FSDKaggle2018", ["Bark", "Cough;Laughter", "Gunshot_or_gunfire"], 2),
    ("voxceleb", "Are the two speakers the same or different?", ["same", "different"], 2),
    ("nsynth", "Classify the music instrument.", ["bass", "guitar", "keyboard", "organ"], 3),
    ("cremad", "Identify the emotion expressed in the speech.", ["angry", "happy", "neutral", "sad"], 1),
    ("asvspoof", "Detect if the audio is genuine or a spoof.", ["genuine", "spoof"], 1),
    ("fma", "Classify the music genre (FMA).", ["Hip-Hop", "Rock", "Folk", "Electronic"], 2),
    ("fsd50k", "Multi-label classification for FSD50k", ["Music;Speech", "Vehicle;Car", "Water;Rain"], 3),
    ("urbansound", "Classify the urban sound.", ["siren", "drilling", "street music"], 1),
    ("gtzan", "Classify the music genre (GTZAN).", ["blues", "jazz", "metal", "reggae"], 1),
    ("vocalsound", "Classify the vocal sound.", ["laughter", "sigh", "sneeze"], 2),
    ("libricount", "Count the amount of speakers.", ["1", "2", "3", "4", "5"], 1),
    ("voxlingua", "Classify the language.", ["English", "German", "Mandarin Chinese"], 3),
]


def make_tasks(n_per_task: int, dim: int, fps: int, seed: int) -> list[ArrayDataset]:
    """Features carry a weak class signal under noise, so the loss falls and answers end with EOS.

    Clips are windows of one shared noise pool (with their own signal added), so thousands of 1280-dim
    clips cost seconds and a few hundred MB, not minutes and gigabytes.
    """
    rng = np.random.default_rng(seed)
    pool = rng.standard_normal((20 * fps * 60, dim), dtype=np.float32).astype(np.float16)
    out = []
    for t, (name, prompt, answers, _) in enumerate(TASKS):
        arrays, targets = [], []
        for _ in range(n_per_task):
            c = int(rng.integers(len(answers)))
            frames = int(rng.uniform(1.0, 10.0) * fps)
            start = int(rng.integers(0, len(pool) - frames))
            x = pool[start : start + frames].copy()
            x[:, (t * 8 + c) % dim] += 3.0
            arrays.append(x)
            targets.append((answers[c],))
        out.append(ArrayDataset(name, prompt, arrays, targets))
    return out


def gpu_memory_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def run_precision(precision: str, decoder: Path, data, test, args, work: Path) -> dict:
    device = resolve_device(args.device)
    dtype = "bfloat16" if precision == "bf16" else "float32"
    model = build_model(ModelConfig(encoder_dim=args.dim, decoder=str(decoder), dtype=dtype))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    weights = [w for *_, w in TASKS]
    warm = min(WARMUP_STEPS, max(1, args.steps // 2))
    cfg = dict(precision=precision, device=args.device, compile=args.compile, checkpoint_every=10**9, log_every=100)
    # a short first run captures the graphs of the length buckets; the measured run reuses them (same model)
    warmup = train(model, data, weights, TrainConfig(max_steps=warm, **cfg), work / f"{precision}-warm", progress=False)
    run = train(model, data, weights, TrainConfig(max_steps=args.steps, **cfg), work / precision, progress=False)
    steady = args.steps / run.seconds
    tokens = _mean_tokens(model, data)
    embedding = model.decoder.get_input_embeddings().weight.numel()
    n_params = sum(p.numel() for p in model.decoder.parameters()) - embedding
    # estimate: frozen weights need no weight gradients, so forward 2NT + input gradients 2NT per row
    flops_per_step = 4 * n_params * tokens * 4
    answers_per_s, texts = _generate(model, test, precision, args)
    return {
        "precision": precision,
        "steps": args.steps,
        "steps_per_s": steady,
        "minutes_for_100k_steps": 100_000 / steady / 60,
        "warmup_steps": warm,
        "warmup_seconds": warmup.seconds,
        "first_loss": float(np.mean(run.losses[:50])),
        "final_loss": float(np.mean(run.losses[-50:])),
        "mean_tokens_per_row": tokens,
        "achieved_tflops_estimate": flops_per_step * steady / 1e12,
        "peak_gpu_memory_gib": gpu_memory_gib(resolve_device(args.device)),
        "answers_per_s": answers_per_s,
        "answers": len(texts),
        "answers_under_10_words": float(np.mean([len(t.split()) < 10 for t in texts])),
    }


def _mean_tokens(model, data) -> float:
    rows = [d.features(i).shape[0] + len(model.prompt_ids(d.prompt)) + 3 for d in data for i in range(len(d))]
    return float(np.mean(rows))


def _generate(model, test, precision: str, args) -> tuple[float, list[str]]:
    options = DecodingOptions(precision=precision, compile=args.compile)
    with Generator(model, options) as gen:
        gen.generate(test[0], progress=False)  # captures the decode step
        t0 = time.perf_counter()
        texts = [p.text for d in test for p in gen.generate(d, progress=False)]
        seconds = time.perf_counter() - t0
    return len(texts) / seconds, texts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--steps", type=int, default=2000, help="training steps per precision")
    p.add_argument("--precisions", default="bf16,fp32", help="comma list of fp32, bf16")
    p.add_argument("--dim", type=int, default=1280, help="feature width (Track A encoders: 768-1280)")
    p.add_argument("--fps", type=int, default=50, help="feature frames per second (25-50)")
    p.add_argument("--clips", type=int, default=64, help="training clips per task (15 tasks)")
    p.add_argument("--test-clips", type=int, default=256, help="test clips per task for generation (15 tasks)")
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"])
    p.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    device = resolve_device(args.device)
    data = make_tasks(args.clips, args.dim, args.fps, seed=0)
    test = make_tasks(args.test_clips, args.dim, args.fps, seed=1)
    report = {"device": describe(device), "torch": torch.__version__, "dim": args.dim, "fps": args.fps,
              "clip_seconds": [1, 10], "batch": 4, "compile": args.compile, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        decoder = build_smollm2_shaped(Path(tmp) / "smollm2")
        for precision in args.precisions.split(","):
            result = run_precision(precision, decoder, data, test, args, Path(tmp))
            report["runs"].append(result)
            print(json.dumps(result), flush=True)
            if args.json:
                args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
