"""The same campaign with each executor: wall time, a rerun's time, per-stage seconds, and equal scores.

    HF_HUB_OFFLINE=1 RAY_AUTH_MODE=disabled .venv/bin/python benchmarks/bench_campaign.py --work /tmp/bench13

Two submissions (the ONNX log-mel template at 80 and 40 bands) on demo-a and demo-b with a tiny decoder
trained on their texts (12 jobs), from an empty campaign folder each time: in the campaign's process,
in ``--jobs 2`` worker processes, and on a local Ray instance (``--ray``; needs the [cluster] extra).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

EXECUTORS = {"local": [], "jobs2": ["--jobs", "2"], "ray": ["--ray"]}


def make_world(work: Path) -> None:
    from evaluator.data import generate_demo, get_track, iter_clips
    from evaluator.resources import template_dir
    from evaluator.smoke_decoder import build_smoke_decoder
    from evaluator.submission.build import build

    if (work / "decoder").is_dir():
        return
    for name, bands in (("mel80", 80), ("mel40", 40)):
        folder = work / name
        shutil.copytree(template_dir() / "onnx", folder, dirs_exist_ok=True)
        source = (folder / "encoder.py").read_text()
        (folder / "encoder.py").write_text(source.replace("N_MELS = 80", f"N_MELS = {bands}"))
        manifest = json.loads((folder / "manifest.json").read_text())
        (folder / "manifest.json").write_text(json.dumps({**manifest, "name": name}))
        build(folder, work / f"{name}.tar")
    texts = []
    for track in ("demo-a", "demo-b"):
        generate_demo(track, work / "data" / track)
        spec = get_track(track, data_home=work / "data")
        texts += [t for task in spec.train_tasks
                  for c in iter_clips(task, "train", data_home=work / "data", limit=12) for t in c.targets]
    build_smoke_decoder(texts, work / "decoder", steps=40)


def scores(out: Path) -> dict:
    jobs = json.loads((out / "campaign.json").read_text())["jobs"]
    return {j["id"]: json.loads((out / j["results"]).read_text())["tasks"] for j in jobs if j["kind"] == "score"}


def stage_seconds(out: Path) -> dict:
    totals: dict[str, float] = {}
    for j in json.loads((out / "campaign.json").read_text())["jobs"]:
        totals[j["kind"]] = round(totals.get(j["kind"], 0.0) + (j["seconds"] or 0.0), 1)
    return totals


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--clips", type=int, default=16)
    p.add_argument("--executors", default="local,jobs2,ray")
    args = p.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    make_world(args.work)
    options = ["--tracks", "demo-a,demo-b", "--max-steps", str(args.steps), "--checkpoint-every", "100",
               "--decoder", str(args.work / "decoder"), "--limit-clips", str(args.clips), "--offline",
               "--data-home", str(args.work / "data"), "--quiet", "--max-new-tokens", "12"]
    rows = {}
    for name in args.executors.split(","):
        out = args.work / f"camp-{name}"
        shutil.rmtree(out, ignore_errors=True)
        cli = [sys.executable, "-m", "evaluator", "campaign", str(args.work / "mel80.tar"), str(args.work / "mel40.tar"),
               "--out", str(out), *options, *EXECUTORS[name]]
        times = []
        for _ in range(2):  # the run, then the rerun that must do no work
            t0 = time.perf_counter()
            subprocess.run(cli, check=True, capture_output=True)
            times.append(time.perf_counter() - t0)
        rows[name] = {"seconds": round(times[0], 1), "rerun_seconds": round(times[1], 1),
                      "stage_seconds": stage_seconds(out), "scores": scores(out)}
        print(json.dumps({name: {k: v for k, v in rows[name].items() if k != "scores"}}), flush=True)
    first = next(iter(rows.values()))["scores"]
    print("scores equal across executors:", all(r["scores"] == first for r in rows.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
