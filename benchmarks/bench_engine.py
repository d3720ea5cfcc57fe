"""Speed of this decoder engine against XARES-LLM's behaviour, on the same data, decoder and encoder.

The reference behaviour is reproduced in this one process: the frozen encoder runs again at every
training step and every generation batch (fp32), one torch thread (its default), the peft model in fp32,
and stock Hugging Face ``generate`` with ``max_new_tokens=150`` over a decoder that never emits EOS
(random weights), at the reference's eval batch size. Our engine reads cached features (extracted once,
outside the timings, as the feature store does), uses every core, and decodes with its own KV-cache
loop over a merged inference copy. Rounds alternate between the two so that machine load hits both
alike; the ratio is taken from medians of the same run.

    python benchmarks/bench_engine.py --quick          # a few minutes on 2 cores
    python benchmarks/bench_engine.py --decoders smollm2 --gen-samples 64
    python benchmarks/bench_engine.py --device cuda --quick --json engine.json   # on a GPU machine

The reference side is an IMITATION of XARES-LLM built from our own model code (its loop, its settings);
`bench_reference.py` measures against the real framework on the CPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI does, before torch loads

import numpy as np  # noqa: E402
import torch  # noqa: E402
from bench_encoder import BenchLogMelEncoder  # noqa: E402 - beside this script, shared with bench_reference.py

from evaluator.compute import describe, resolve_device  # noqa: E402
from evaluator.features import ArrayDataset  # noqa: E402
from evaluator.generation import DecodingOptions, generate  # noqa: E402
from evaluator.model import Batch, ModelConfig, build_model  # noqa: E402
from evaluator.smoke_decoder import build_smoke_decoder, build_smollm2_shaped  # noqa: E402
from evaluator.training import TrainConfig, train  # noqa: E402

SAMPLE_RATE = 16_000
PROMPT = "Classify the sound."
TEXTS = ["a dog barks", "rain falls on the roof", "a cat meows", "the bell rings twice", "speech", "music"]


def make_clips(n: int, seed: int) -> list[tuple[np.ndarray, str]]:
    rng = np.random.default_rng(seed)
    clips = []
    for i in range(n):
        seconds = float(rng.uniform(1.0, 5.0))  # short clips, as in most Track A tasks
        t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
        wave = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 2000) * t) + 0.05 * rng.normal(size=t.shape)
        clips.append((wave.astype(np.float32), TEXTS[i % len(TEXTS)]))
    return clips


def encode(encoder, waves: list[np.ndarray]) -> list[torch.Tensor]:
    device = encoder.window.device
    audio = torch.nn.utils.rnn.pad_sequence([torch.from_numpy(w) for w in waves], batch_first=True).to(device)
    samples = torch.arange(audio.shape[1], device=device)[None] < torch.tensor([len(w) for w in waves], device=device)[:, None]
    with torch.no_grad():
        feats, mask = encoder(audio, samples.long())
    return [feats[i, : int(mask[i].sum())] for i in range(len(waves))]


def cached_features(encoder, clips) -> ArrayDataset:
    """Features extracted once, outside the timing: what the feature store hands the engine."""
    arrays = [f.cpu().numpy().astype(np.float16) for w, _ in clips for f in encode(encoder, [w])]
    return ArrayDataset("bench", PROMPT, arrays, [(text,) for _, text in clips])


# --- the reference behaviour ---------------------------------------------------------------------
def reference_train(model, encoder, clips, steps: int, batch_size: int, seed: int) -> float:
    """Seconds per step of XARES-LLM's loop: encoder rerun on raw audio, fp32, one thread."""
    torch.set_num_threads(1)
    rng = np.random.default_rng(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    model.train()
    t0 = time.perf_counter()
    for _ in range(steps):
        chosen = [clips[j] for j in rng.choice(len(clips), batch_size, replace=False)]
        feats = encode(encoder, [w for w, _ in chosen])  # the encoder runs again at every step
        batch = Batch(feats, [model.prompt_ids(PROMPT)] * batch_size, [model.target_ids(t) for _, t in chosen])
        x = model.embed(batch)  # the stock HF loss: LM head over every position
        loss = model.decoder(inputs_embeds=x.inputs_embeds, attention_mask=x.attention_mask, labels=x.labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # the HF Trainer reads the loss back at every step
    return (time.perf_counter() - t0) / steps


def reference_generate(model, encoder, clips, batch_size: int) -> float:
    """Samples/s of stock HF generate (150 new tokens, penalty 1.05) with the encoder rerun, one thread."""
    torch.set_num_threads(1)
    model.eval()
    prompt = model.prompt_ids(PROMPT)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for b in range(0, len(clips), batch_size):
            feats = encode(encoder, [w for w, _ in clips[b : b + batch_size]])
            x = model.embed(Batch(feats, [prompt] * len(feats)), padding_side="left")
            model.decoder.generate(inputs_embeds=x.inputs_embeds, attention_mask=x.attention_mask,
                                   max_new_tokens=150, do_sample=False, repetition_penalty=1.05,
                                   pad_token_id=model.pad_token_id)
    return len(clips) / (time.perf_counter() - t0)


# --- our engine ----------------------------------------------------------------------------------
def engine_train(model, dataset, steps: int, precision: str, args, out: Path) -> float:
    cfg = TrainConfig(max_steps=steps, precision=precision, threads=args.threads, checkpoint_every=10**9,
                      sort_buffer=32, device=args.device, compile=args.compile)
    result = train(model, [dataset], [1.0], cfg, out, progress=False)
    return result.seconds / steps


def engine_generate(model, dataset, precision: str, args) -> float:
    opts = DecodingOptions(batch_size=args.batch, precision=precision, threads=args.threads, compile=args.compile)
    t0 = time.perf_counter()
    generate(model, dataset, opts, progress=False)
    return len(dataset) / (time.perf_counter() - t0)


def bench_decoder(name: str, decoder: Path, args, work: Path) -> list[tuple[str, str, float, float, str]]:
    device = resolve_device(args.device)
    encoder = BenchLogMelEncoder().eval().to(device)
    clips = make_clips(max(args.train_clips, args.gen_samples), seed=0)
    dataset = cached_features(encoder, clips)
    gen_clips = clips[: args.gen_samples]
    gen_set = cached_features(encoder, gen_clips)
    rows = []

    def model(dtype="float32"):
        return build_model(ModelConfig(encoder_dim=encoder.output_dim, decoder=str(decoder), dtype=dtype)).to(device)

    # training: alternate rounds, medians; the tiny decoder's steps are so short that it runs 10x more of
    # them, so that train()'s fixed costs per call (first buffer, final checkpoint) do not dominate.
    # On a GPU a first, untimed round captures the graphs of the length buckets.
    steps = args.train_steps * (10 if name == "tiny" else 1)
    ref_m, fp32_m, bf16_m = model(), model(), model("bfloat16")
    if device.type == "cuda":
        engine_train(fp32_m, dataset, steps, "fp32", args, work / f"{name}-fp32-warm")
        engine_train(bf16_m, dataset, steps, "bf16", args, work / f"{name}-bf16-warm")
    ref, fp32, bf16 = [], [], []
    for r in range(args.rounds):
        ref.append(reference_train(ref_m, encoder, clips, steps, 4, seed=r))
        fp32.append(engine_train(fp32_m, dataset, steps, "fp32", args, work / f"{name}-fp32-{r}"))
        bf16.append(engine_train(bf16_m, dataset, steps, "bf16", args, work / f"{name}-bf16-{r}"))
        print(f"  [{name}] train round {r}: ref {ref[-1]:.3f} s/step, fp32 {fp32[-1]:.3f}, bf16 {bf16[-1]:.3f}",
              file=sys.stderr, flush=True)
    ref_s = statistics.median(ref)
    unit = "steps/s"
    rows.append((name, "training, fp32 (deterministic)", 1 / ref_s, 1 / statistics.median(fp32), unit))
    rows.append((name, "training, bf16", 1 / ref_s, 1 / statistics.median(bf16), unit))
    del ref_m, bf16_m, fp32_m

    # generation: an untrained model (random decoder, LoRA B = 0) never emits EOS, so both sides produce
    # all 150 tokens; the reference at its eval batch size, ours at its own
    gen_m = model()
    ref_g = reference_generate(gen_m, encoder, gen_clips[: args.ref_gen_samples], args.ref_batch)
    if device.type == "cuda":
        engine_generate(gen_m, gen_set, "fp32", args)  # captures the decode step's graphs
    ours32 = engine_generate(gen_m, gen_set, "fp32", args)
    ours16 = engine_generate(gen_m, gen_set, "bf16", args)
    print(f"  [{name}] generation: ref {ref_g:.3f}, fp32 {ours32:.3f}, bf16 {ours16:.3f} samples/s",
          file=sys.stderr, flush=True)
    batch = args.batch or (256 if device.type == "cuda" else 32)
    rows.append((name, f"generation, fp32, batch {batch} vs {args.ref_batch}", ref_g, ours32, "samples/s"))
    rows.append((name, f"generation, bf16, batch {batch} vs {args.ref_batch}", ref_g, ours16, "samples/s"))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--decoders", default="tiny,smollm2", help="comma list of: tiny, smollm2")
    p.add_argument("--quick", action="store_true", help="few steps and samples: a few minutes on 2 cores")
    p.add_argument("--device", default="cpu", help="auto | cpu | cuda | cuda:N (both sides run there)")
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"], help="our graph capture")
    p.add_argument("--train-steps", type=int, default=10, help="steps per round and mode")
    p.add_argument("--rounds", type=int, default=3, help="alternating timing rounds (median taken)")
    p.add_argument("--train-clips", type=int, default=64, help="training clips (1-5 s each)")
    p.add_argument("--gen-samples", type=int, default=64, help="test clips generated for (ours)")
    p.add_argument("--ref-gen-samples", type=int, default=16, help="test clips generated for (reference)")
    p.add_argument("--ref-batch", type=int, default=4, help="the reference's eval batch size (most tasks: 4)")
    p.add_argument("--batch", type=int, default=None, help="our generation batch [default: the engine's, 32 CPU / 256 GPU]")
    p.add_argument("--threads", type=int, default=None, help="our torch threads [default: the engine's, usable cores]")
    p.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    if args.quick:
        args.train_steps, args.rounds, args.gen_samples, args.train_clips, args.ref_gen_samples = 4, 2, 32, 32, 8
        if resolve_device(args.device).type == "cuda":  # GPU steps are short: more of them, more clips
            args.train_steps, args.gen_samples, args.ref_gen_samples = 50, 512, 32
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in args.decoders.split(","):
            if name == "tiny":
                decoder = build_smoke_decoder(TEXTS, work / "tiny", steps=0, hidden_size=96, threads=1)  # random: no EOS
            elif name == "smollm2":
                decoder = build_smollm2_shaped(work / "smollm2")
            else:
                p.error(f"unknown decoder {name!r}")
            rows += bench_decoder(name, decoder, args, work)

    where = describe(resolve_device(args.device))
    print(f"\n{where}, torch {torch.__version__}; reference (imitation): 1 CPU thread, encoder rerun, stock "
          f"generate; ours: cached features, threads {args.threads or 'default'}, compile {args.compile}\n")
    print("| decoder | measure | reference (imitation) | this engine | speed-up |")
    print("|---|---|---|---|---|")
    for name, what, ref, ours, unit in rows:
        print(f"| {name} | {what} | {ref:.3g} {unit} | {ours:.3g} {unit} | {ours / ref:.2f}x |")
    if args.json:
        args.json.write_text(json.dumps({
            "device": where, "torch": torch.__version__, "compile": args.compile, "quick": args.quick,
            "rows": [{"decoder": n, "measure": w, "reference_imitation": r, "engine": o, "unit": u, "speedup": o / r}
                     for n, w, r, o, u in rows]}, indent=2))
    return 0 if all(math.isfinite(r[3]) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
