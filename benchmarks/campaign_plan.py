"""How long the whole challenge takes on D devices: the campaign's real job graph, timed from per-stage rates.

    python benchmarks/campaign_plan.py --profile cpu --devices 1,8                 # this project's CPU figures
    python benchmarks/campaign_plan.py --profile gpu-targets --devices 1,8          # issue 8/12 targets (not measured)
    python benchmarks/campaign_plan.py --gpu-check gpu-check.json --devices 1,8    # figures of benchmarks/gpu/check.sh

The graph is `evaluator.campaign.plan_jobs` for the four tracks (extract per submission and track, train per
submission and decoder track in packs, score per submission and track, B-hidden after B). Each job's time is
its work over a rate: audio-seconds over the encoder's extraction rate, steps over the training rate of a
job sharing its device with the rest of its pack, answers over the generation rate. Jobs are placed greedily
in graph order on the first free slot: each device has ``pack`` training/scoring slots and one extraction
slot. The reference (XARES-LLM) trains one decoder at a time per device, reruns the encoder at every step
(4 clips) and generates with the stock loop: its time is computed from its own rates, without a graph.
The workload (answers and audio per track) is an input: the defaults are rough public dataset sizes, printed
with the result; give the real ones with --answers/--audio-hours.
"""

from __future__ import annotations

import argparse
import heapq
import json
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluator.campaign import plan_jobs  # noqa: E402

TRACKS = [SimpleNamespace(name=n, decoder_track=d) for n, d in
          (("A", "A"), ("A-hidden", "A-hidden"), ("B", "B"), ("B-hidden", "B"))]
# Rough sizes (public test sets; one answer per clip; training + test audio the extraction reads). Inputs, not facts.
ANSWERS = {"A": 263_000, "A-hidden": 6_000, "B": 14_000, "B-hidden": 8_000}
AUDIO_HOURS = {"A": 1_000, "A-hidden": 60, "B": 350, "B-hidden": 40}  # train split of its decoder track + test
LONG = {"B", "B-hidden"}  # answers of up to 150 tokens (transcripts, captions), not labels

# "pack": K -> the job-steps/s of K jobs packed on one device over the steps/s of one job alone there
PROFILES = {
    # measured on this project's CPU machine (2 vCPUs, docs/benchmarks.md issue 8 and 3): one "device" = the machine
    "cpu": {"source": "measured, 2-vCPU Xeon (docs/benchmarks.md, issues 3, 8, 12)",
            "train_steps_per_s": 0.413, "pack": {"1": 1.0, "2": 1.06},
            "answers_per_s": 0.968, "long_answers_per_s": 0.968, "extract_audio_s_per_s": 480.0,
            "ref_train_steps_per_s": 0.268, "ref_answers_per_s": 0.156, "ref_long_answers_per_s": 0.156},
    # what issues 8 and 12 ask of one H100/H200; NOT measured (no GPU was lent yet)
    "gpu-targets": {"source": "targets of issues 8 and 12, not measured",
                    "train_steps_per_s": 30.0, "pack": {"1": 1.0, "8": 5.0},  # 8 packed = 5 solo jobs' worth
                    "answers_per_s": 2000.0, "long_answers_per_s": 200.0, "extract_audio_s_per_s": 2000.0,
                    "ref_train_steps_per_s": None, "ref_answers_per_s": None, "ref_long_answers_per_s": None},
}


def from_gpu_check(path: Path) -> dict:
    """Rates from benchmarks/gpu/check.sh's gpu-check.json (fp32: the protocol)."""
    doc = json.loads(path.read_text())
    runs = {r["precision"]: r for r in (doc.get("train_track_a") or {}).get("runs", [])}
    fp32 = runs.get("fp32") or next(iter(runs.values()))
    pack = {"1": 1.0}  # K -> K packed jobs' job-steps/s over one solo job's steps/s (bench_pack.py's speed-up)
    for row in ((doc.get("pack") or {}).get("runs") or []):
        if row.get("kind") == "pack" and row.get("precision") == "fp32" and row.get("speedup_vs_solo"):
            pack[str(row["k"])] = row["speedup_vs_solo"]
    return {"source": f"measured: {path}", "train_steps_per_s": fp32["steps_per_s"], "pack": pack,
            "answers_per_s": fp32["answers_per_s"], "long_answers_per_s": None, "extract_audio_s_per_s": None,
            "ref_train_steps_per_s": None, "ref_answers_per_s": None, "ref_long_answers_per_s": None}


def durations(profile: dict, answers: dict, audio_hours: dict, steps: int, pack: int) -> dict[str, float]:
    """Seconds of each kind of job, per track, with ``pack`` jobs sharing a device."""
    speedup = profile["pack"].get(str(pack))
    if speedup is None:
        raise SystemExit(f"no pack figure for K={pack} in the profile ({sorted(profile['pack'])})")
    per_job_rate = profile["train_steps_per_s"] * speedup / pack  # each of the pack's jobs
    long_rate = profile["long_answers_per_s"] or profile["answers_per_s"] / 10
    extract_rate = profile["extract_audio_s_per_s"] or 1000.0
    d = {}
    for t in TRACKS:
        d[f"extract/{t.name}"] = audio_hours[t.name] * 3600 / extract_rate
        if t.decoder_track == t.name:  # B-hidden has no decoder of its own
            d[f"train/{t.name}"] = steps / per_job_rate
        d[f"score/{t.name}"] = answers[t.name] / (long_rate if t.name in LONG else profile["answers_per_s"]) * pack
    return d


def schedule(submissions: int, devices: int, pack: int, seconds: dict[str, float]) -> tuple[float, float]:
    """Makespan and device-seconds busy of the campaign graph, placed greedily on ``devices``."""
    names = [f"s{i:02d}.tar" for i in range(submissions)]
    jobs = plan_jobs(names, TRACKS, 1)  # one train job per decoder; the device's slots make the packs
    done_at: dict[str, float] = {}
    slots = {"extract": [0.0] * devices, "gpu": [0.0] * (devices * pack)}
    heapq.heapify(slots["extract"])
    heapq.heapify(slots["gpu"])
    busy = 0.0
    for job in jobs:  # graph order: every job after its dependencies
        kind = "extract" if job.kind == "extract" else "gpu"
        free = heapq.heappop(slots[kind])
        start = max([free] + [done_at[d] for d in job.deps])
        length = seconds[f"{job.kind}/{job.track}"]
        done_at[job.id] = start + length
        busy += length if kind == "extract" else length / pack
        heapq.heappush(slots[kind], start + length)
    return max(done_at.values()), busy


def reference_hours(profile: dict, answers: dict, steps: int, submissions: int) -> float | None:
    """Device-hours of the reference: one decoder at a time, encoder rerun inside each step (in its rate)."""
    if not profile.get("ref_train_steps_per_s"):
        return None
    decoders = submissions * len({t.decoder_track for t in TRACKS})
    train = decoders * steps / profile["ref_train_steps_per_s"]
    score = submissions * sum(answers[t.name] / (profile["ref_long_answers_per_s"] if t.name in LONG
                                                 else profile["ref_answers_per_s"]) for t in TRACKS)
    return (train + score) / 3600


def _pairs(text: str | None, default: dict) -> dict:
    out = dict(default)
    for item in filter(None, (text or "").split(",")):
        key, value = item.split("=")
        out[key] = float(value)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--profile", choices=sorted(PROFILES), default="gpu-targets")
    p.add_argument("--gpu-check", type=Path, default=None, help="rates from benchmarks/gpu/check.sh's JSON")
    p.add_argument("--devices", default="1,8")
    p.add_argument("--submissions", type=int, default=23)
    p.add_argument("--steps", type=int, default=100_000)
    p.add_argument("--pack", type=int, default=None, help="jobs per device (default: the profile's best)")
    p.add_argument("--answers", default=None, help="e.g. A=263000,B=14000 (default: rough public sizes)")
    p.add_argument("--audio-hours", default=None, help="e.g. A=1000,B=350 (default: rough public sizes)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    profile = from_gpu_check(args.gpu_check) if args.gpu_check else PROFILES[args.profile]
    answers, hours = _pairs(args.answers, ANSWERS), _pairs(args.audio_hours, AUDIO_HOURS)
    pack = args.pack or int(max(profile["pack"], key=profile["pack"].get))  # the highest throughput
    seconds = durations(profile, answers, hours, args.steps, pack)
    report = {"profile": profile, "answers": answers, "audio_hours": hours, "steps": args.steps,
              "submissions": args.submissions, "pack": pack, "job_hours": {k: v / 3600 for k, v in seconds.items()},
              "plans": []}
    print(f"rates: {profile['source']}; {args.submissions} submissions, {args.steps} steps, {pack} jobs per device")
    print("| devices | wall-clock | device-hours busy |")
    print("|---|---|---|")
    for n in map(int, args.devices.split(",")):
        makespan, busy = schedule(args.submissions, n, pack, seconds)
        report["plans"].append({"devices": n, "hours": makespan / 3600, "device_hours": busy / 3600})
        print(f"| {n} | {makespan / 3600:,.1f} h ({makespan / 86400:,.1f} days) | {busy / 3600:,.1f} |")
    ref = reference_hours(profile, answers, args.steps, args.submissions)
    report["reference_device_hours"] = ref
    print(f"reference: {ref:,.0f} device-hours" if ref else "reference: no figure for it in this profile")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
