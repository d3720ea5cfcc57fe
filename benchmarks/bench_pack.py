"""Packed training (issue 12): job-steps/s of K decoders trained in one pass, against solo runs.

K jobs (projector + LoRA r=8, batch 4, the protocol's settings; encoder shapes 768x25 and 1280x50 in turn,
synthetic Track A-shaped features) share one frozen SmolLM2-135M-shaped decoder through `train_packed`.
K solo runs in sequence run at the solo `train` rate of their shapes, measured too. The steps after
`--warmup` are timed; on a CPU each run is its own process (its own peak RSS). One JSON file::

    python benchmarks/bench_pack.py --device cuda --json pack.json
    .venv/bin/python benchmarks/bench_pack.py --device cpu --threads 2 --quick     # ~2 min on 2 cores
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, when run as a script
from evaluator.cores import PROC_STAT, _busy_ticks, busy_elsewhere, settle_openmp  # noqa: E402

settle_openmp()  # before torch loads, as the CLI does
CHILD_ENV = dict(os.environ)  # what the per-run processes start with (train_track_a's import sets a wait policy)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.gpu.train_track_a import TASKS  # noqa: E402
from evaluator.compute import describe, resolve_device, use_compile  # noqa: E402
from evaluator.features import ArrayDataset  # noqa: E402
from evaluator.model import ModelConfig, build_model  # noqa: E402
from evaluator.pack import DecoderPack  # noqa: E402
from evaluator.smoke_decoder import build_smollm2_shaped  # noqa: E402
from evaluator.training import PackedJob, TrainConfig, train, train_packed  # noqa: E402

CHALLENGE_DECODERS = 70  # the whole challenge's decoder trainings (submissions x tracks), for the estimate
CHALLENGE_STEPS = 100_000  # steps per decoder (the official tracks)
TARGET_K, TARGET_SPEEDUP = 8, 5.0  # the GPU target: 8 packed jobs >= 5x 8 solo runs in sequence


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """'768x25,1280x50' -> [(768, 25), (1280, 50)]: (encoder width, frames per second) of jobs 0, 1, 0, 1, ..."""
    return [(int(d), int(f)) for d, f in (s.split("x") for s in text.split(","))]


def job_data(i: int, dim: int, fps: int, args) -> list[ArrayDataset]:
    """Job i's 15 Track A tasks: clips of `--seconds` at `fps`, each a window of one noise pool per shape.

    Windows are views (no copy), so 16 jobs cost one pool per shape; each job draws its own clip lengths.
    """
    pool = np.random.default_rng([dim, fps]).standard_normal((fps * 120, dim), dtype=np.float32).astype(np.float16)
    rng = np.random.default_rng([i, 7])
    lo, hi = args.seconds
    out = []
    for name, prompt, answers, _ in TASKS:
        arrays, targets = [], []
        for _ in range(args.clips):
            frames = int(rng.uniform(lo, hi) * fps)
            start = int(rng.integers(0, len(pool) - frames))
            arrays.append(pool[start : start + frames])
            targets.append((answers[int(rng.integers(len(answers)))],))
        out.append(ArrayDataset(name, prompt, arrays, targets, frames_per_second=fps))
    return out


class Stamps:
    """Wraps the loss call of a training loop (one call per optimizer step) and times steps [first, last).

    On a GPU the two timed calls synchronise first, so the window holds exactly the device's work of its
    steps; no other call waits. Also counts real and padded token positions of the timed steps, and the
    cores other processes kept busy meanwhile (/proc/stat minus this process's CPU time).
    """

    def __init__(self, fn, first: int, last: int, device: torch.device):
        self.fn, self.first, self.last, self.device = fn, first, last, device
        self.calls, self.times, self.real, self.padded, self.cpu = 0, {}, 0, 0, {}

    def _stamp(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.times[self.calls] = time.perf_counter()
        own = os.times()
        self.cpu[self.calls] = (_busy_ticks(PROC_STAT, None), own.user + own.system)

    def __call__(self, *args, **kwargs):
        if self.calls in (self.first, self.last):
            self._stamp()
        if self.first <= self.calls < self.last:
            batches = args[1] if len(args) > 1 and isinstance(args[1], list) else [args[0]]
            masks = [c.attention_mask for c in batches]
            self.real += int(sum(m.sum() for m in masks))
            self.padded += sum(m.shape[0] for m in masks) * max(m.shape[1] for m in masks)
        self.calls += 1
        return self.fn(*args, **kwargs)

    def steps_per_s(self) -> float:
        if self.last not in self.times:
            raise RuntimeError(f"the loop made {self.calls} loss calls, expected > {self.last}")
        return (self.last - self.first) / (self.times[self.last] - self.times[self.first])

    def padding(self) -> float:
        return 1 - self.real / self.padded if self.padded else 0.0

    def other_cores(self) -> float | None:
        (busy0, own0), (busy1, own1) = self.cpu[self.first], self.cpu[self.last]
        if busy0 is None or busy1 is None:
            return None
        seconds = self.times[self.last] - self.times[self.first]
        return max(0.0, ((busy1 - busy0) / os.sysconf("SC_CLK_TCK") - (own1 - own0)) / seconds)


def measure(spec: str, precision: str, args, decoder: Path, work: Path) -> dict:
    """One configuration: 'solo:S' (job S alone, solo `train`) or 'pack:K' (jobs 0..K-1 in one pack)."""
    kind, n = spec.split(":")
    n = int(n)
    device = resolve_device(args.device)
    shapes = parse_shapes(args.shapes)
    dtype = "bfloat16" if precision == "bf16" else "float32"
    if device.type == "cuda":  # the previous run's model and captured graphs leave the device first
        torch._dynamo.reset()
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    weights = [w for *_, w in TASKS]
    steps = args.warmup + args.steps + 1
    shared = dict(precision=precision, device=args.device, threads=args.threads, checkpoint_every=10**9)
    row: dict = {"kind": kind, "precision": precision}
    t0 = time.perf_counter()
    if kind == "solo":
        dim, fps = shapes[n % len(shapes)]
        model = build_model(ModelConfig(encoder_dim=dim, decoder=str(decoder), dtype=dtype), seed=42)
        data = job_data(n, dim, fps, args)
        compiled = use_compile(args.compile, device)
        cfg = TrainConfig(max_steps=steps, compile=args.compile, **shared)
        if compiled:  # captures every length bucket the timed run meets (same seed, same batches)
            train(model, data, weights, cfg, work / f"{spec}-{precision}-capture", progress=False)
        stamps = Stamps(model.loss, args.warmup, args.warmup + args.steps, device)
        model.loss = stamps
        train(model, data, weights, cfg, work / f"{spec}-{precision}", progress=False)
        row.update(k=1, job=n, dim=dim, fps=fps, compile=compiled)
        del model
    else:
        pack = DecoderPack(ModelConfig(encoder_dim=1, decoder=str(decoder), dtype=dtype))
        jobs = []
        for i in range(n):
            dim, fps = shapes[i % len(shapes)]
            job = pack.add_job(ModelConfig(encoder_dim=dim, decoder=str(decoder), dtype=dtype), seed=42)
            jobs.append(PackedJob(f"job{i}", job, job_data(i, dim, fps, args), weights,
                                  TrainConfig(max_steps=steps, **shared), work / f"{spec}-{precision}" / f"job{i}"))
        stamps = Stamps(pack.loss, args.warmup, args.warmup + args.steps, device)
        pack.loss = stamps
        outcomes = train_packed(pack, jobs, progress=False)
        failed = [f"{o.name}: {o.error}" for o in outcomes if o.error is not None]
        if failed:
            raise RuntimeError("jobs left the pack: " + "; ".join(failed))
        row.update(k=n, compile=False)
        pack.close()
        del pack, jobs, outcomes
    rate = stamps.steps_per_s()
    row.update(steps_per_s=rate, job_steps_per_s=rate * row["k"], timed_steps=args.steps,
               warmup_steps=args.warmup, padding_fraction=stamps.padding(), other_cores=stamps.other_cores(),
               seconds=time.perf_counter() - t0)
    if device.type == "cuda":
        row["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        import resource

        row["peak_memory_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    return row


def wait_idle(limit: float) -> float:
    """Wait up to ``limit`` seconds until other processes keep less than half a core busy; seconds waited."""
    t0 = time.perf_counter()
    while limit > 0 and time.perf_counter() - t0 < limit and busy_elsewhere(1.0) >= 0.5:
        time.sleep(4)
    return time.perf_counter() - t0


def memory_needed(rows: list[dict], k: int) -> str | None:
    """Why a CPU pack of K jobs is not started: its peak RSS, scaled from the last pack's, exceeds the free memory.

    Activations grow with the jobs (~2.3 GiB per job at 1-2 s clips in fp32); an out-of-memory kill on a
    shared machine may take other processes down with it.
    """
    import psutil

    last = next((r for r in reversed(rows) if r["kind"] == "pack" and "peak_memory_gib" in r), None)
    if not last:
        return None
    need = last["peak_memory_gib"] * k / last["k"]
    free = psutil.virtual_memory().available / 2**30
    return f"not run: needs ~{need:.0f} GiB (K={last['k']} peaked at {last['peak_memory_gib']:.1f}), " \
           f"{free:.0f} GiB available" if need > 0.9 * free else None


def run_child(spec: str, precision: str, argv: list[str], decoder: Path) -> dict:
    """The configuration in a fresh process (its own peak RSS); its last stdout line is the row."""
    cmd = [sys.executable, __file__, *argv, "--one", f"{spec}@{precision}", "--decoder", str(decoder)]
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True, env=CHILD_ENV).stdout
    return json.loads(out.strip().splitlines()[-1])


def hours(job_steps_per_s: float) -> float:
    return CHALLENGE_DECODERS * CHALLENGE_STEPS / job_steps_per_s / 3600


def summarize(rows: list[dict], shapes: list[tuple[int, int]]) -> dict:
    """Speed-ups vs K solo runs in sequence (jobs 0..K-1 each at its shape's solo rate) and the estimate."""
    done = [r for r in rows if "error" not in r]
    solo = {r["job"]: r["steps_per_s"] for r in done if r["kind"] == "solo"}
    packs = [r for r in done if r["kind"] == "pack"]
    if len(solo) < min(len(shapes), max([r["k"] for r in packs], default=len(shapes))):
        return {}
    for r in packs:
        seconds = sum(1 / solo[i % len(shapes)] for i in range(r["k"]))  # one step of each of the K jobs, solo
        r["solo_job_steps_per_s"] = r["k"] / seconds
        r["speedup_vs_solo"] = r["job_steps_per_s"] / r["solo_job_steps_per_s"]
    mix = len(solo) / sum(1 / rate for rate in solo.values())  # one solo job, shapes in turn
    # the best pack by its speed-up, which compares like with like (K=1 holds only the first shape)
    best = max(packs, key=lambda r: r["speedup_vs_solo"], default=None)
    out = {"solo_job_steps_per_s": mix, "challenge": {
        "decoders": CHALLENGE_DECODERS, "steps": CHALLENGE_STEPS, "solo_hours": hours(mix)}}
    if best:
        out["best_k"] = best["k"]
        out["packed_job_steps_per_s"] = mix * best["speedup_vs_solo"]  # the shapes' mix at the best speed-up
        out["challenge"].update(best_k=best["k"], packed_hours=hours(out["packed_job_steps_per_s"]))
    target = next((r for r in packs if r["k"] == TARGET_K), None)
    if target:
        out["target"] = {"k": TARGET_K, "speedup_needed": TARGET_SPEEDUP, "speedup": target["speedup_vs_solo"],
                         "met": target["speedup_vs_solo"] >= TARGET_SPEEDUP}
    return out


def table(rows: list[dict]) -> str:
    lines = ["| run | K | steps/s | job-steps/s | vs solo | padding | peak memory | other processes |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["kind"] != "solo", r["k"], r.get("job", 0))):  # runs may come in any order
        if "error" in r:
            lines.append(f"| {r['kind']}, {r['precision']} | {r['k']} | {r['error']} | | | | | |")
            continue
        name = f"solo job {r['job']} ({r['dim']}x{r['fps']})" if r["kind"] == "solo" else "packed"
        others = "—" if r["other_cores"] is None else f"{r['other_cores']:.2f} cores"
        speed = f"{r['speedup_vs_solo']:.2f}x" if "speedup_vs_solo" in r else "—"
        lines.append(f"| {name}, {r['precision']} | {r['k']} | {r['steps_per_s']:.3g} | {r['job_steps_per_s']:.3g} "
                     f"| {speed} | {r['padding_fraction']:.0%} | {r['peak_memory_gib']:.2f} GiB "
                     f"| {others} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--packs", default="1,2,4,8,16", help="comma list of K, jobs per pack")
    p.add_argument("--steps", type=int, default=None, help="timed steps per run (default: 40 on a GPU, 3 on a CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed first steps (default: 10 on a GPU, 1 on a CPU)")
    p.add_argument("--precision", default="fp32", help="comma list of fp32, bf16")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the usable cores)")
    p.add_argument("--shapes", default="768x25,1280x50", help="jobs' (width x frames/s), in turn")
    p.add_argument("--seconds", default="1,10", help="clip lengths, min,max seconds (Track A: 1-10)")
    p.add_argument("--clips", type=int, default=16, help="training clips per task and job (15 tasks)")
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                   help="graph capture of the solo baseline (auto: CUDA only); packs run eagerly")
    p.add_argument("--budget-s", type=float, default=None, help="start no new run after this many seconds")
    p.add_argument("--wait-idle", type=float, default=0, help="before each run, wait up to this many seconds "
                   "for other processes to leave the cores (< 0.5 busy)")
    p.add_argument("--quick", action="store_true", help="K=1,2, 1 timed step, 1-2 s clips: a smoke run")
    p.add_argument("--json", type=Path, default=None, help="write the figures here (after every run)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: one run in this process
    p.add_argument("--decoder", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    if args.quick:
        args.packs, args.seconds, args.clips = "1,2", "1,2", 4
        args.steps = args.steps or 1
    args.steps = args.steps or (40 if gpu else 3)
    args.warmup = (10 if gpu else 1) if args.warmup is None else args.warmup
    args.seconds = tuple(float(s) for s in args.seconds.split(","))
    if args.one:
        spec, precision = args.one.split("@")
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(measure(spec, precision, args, args.decoder, Path(tmp))), flush=True)
        return 0

    shapes = parse_shapes(args.shapes)
    packs = [int(k) for k in args.packs.split(",")]
    report = {"device": describe(device), "torch": torch.__version__, "threads": args.threads,
              "shapes": [f"{d}x{f}" for d, f in shapes], "clip_seconds": list(args.seconds), "batch": 4,
              "timed_steps": args.steps, "warmup_steps": args.warmup, "packs": packs,
              "baseline": "K solo runs in sequence = the solo train() rate of each job's shape", "runs": []}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        decoder = build_smollm2_shaped(Path(tmp) / "smollm2")
        specs = [f"solo:{s}" for s in range(min(len(shapes), max(packs)))] + [f"pack:{k}" for k in packs]
        for precision in args.precision.split(","):
            rows = []
            for spec in specs:
                if args.budget_s and time.perf_counter() - t0 > args.budget_s:
                    print(f"budget of {args.budget_s:.0f} s spent: {spec} {precision} not run", file=sys.stderr)
                    continue
                kind, n = spec.split(":")
                failed = {"kind": kind, "k": int(n), "precision": precision} if kind == "pack" else \
                    {"kind": kind, "k": 1, "job": int(n), "precision": precision}
                too_big = None if gpu else memory_needed(rows, int(n)) if kind == "pack" else None
                if too_big:
                    row = {**failed, "error": too_big}
                else:
                    waited = wait_idle(args.wait_idle)
                    try:
                        row = (measure(spec, precision, args, decoder, Path(tmp)) if gpu
                               else run_child(spec, precision, argv, decoder))
                        row["waited_for_idle_s"] = waited
                    except (RuntimeError, subprocess.CalledProcessError) as e:  # CUDA out of memory, a killed child
                        row = {**failed, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
                        gc.collect()
                rows.append(row)
                print(f"{spec} {precision}: " + (row["error"] if "error" in row else
                      f"{row['job_steps_per_s']:.3g} job-steps/s ({row['seconds']:.0f} s)"), file=sys.stderr, flush=True)
                report["runs"] = [r for r in report["runs"] if r["precision"] != precision] + rows
                report.setdefault("summary", {})[precision] = summarize(rows, shapes)
                if args.json:
                    args.json.write_text(json.dumps(report, indent=2))
            if rows:
                print(f"\n{precision}, {report['device']}, torch {torch.__version__}:\n{table(rows)}")
            s = report.get("summary", {}).get(precision)
            if s:
                c = s["challenge"]
                print(f"70 decoders x 100,000 steps: {c['solo_hours']:,.0f} h solo (one job after another, "
                      f"{s['solo_job_steps_per_s']:.3g} steps/s), {c.get('packed_hours', float('nan')):,.0f} h "
                      f"packed (K={c.get('best_k')}, {s.get('packed_job_steps_per_s', float('nan')):.3g} job-steps/s)")
                if "target" in s:
                    t = s["target"]
                    print(f"target: {t['k']} packed >= {t['speedup_needed']:.0f}x {t['k']} solo runs: "
                          f"{t['speedup']:.2f}x, {'met' if t['met'] else 'not met'}")
    report["seconds"] = time.perf_counter() - t0
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
