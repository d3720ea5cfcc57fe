"""``xares-eval demo``: the whole evaluation, offline, on data and a decoder made here.

It builds the template submission (log-mel baseline, no pretrained weights), generates the demo tracks
with espeak-ng and sox, builds a *smoke-test* decoder (a tiny Llama pre-trained for a moment on the demo
texts so that it can emit EOS — not SmolLM2, and its scores say nothing about real tracks), runs
demo-a and demo-b through `xares-eval run`'s code path and prints the leaderboard next to chance level.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import click

DEMO_TRACKS = ("demo-a", "demo-b")


@click.command(
    epilog="""\b
Examples:
  xares-eval demo                       # everything under ./demo_out
  xares-eval demo --out /tmp/demo --max-steps 300
Rerunning reuses the submission, data, decoder, features and checkpoints already there.""",
)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("demo_out"),
              show_default=True, help="Folder for the demo submission, data, decoder and results.")
@click.option("--max-steps", type=click.IntRange(min=1), default=800, show_default=True,
              help="Training steps per demo track.")
@click.option("--decoder-steps", type=click.IntRange(min=1), default=400, show_default=True,
              help="Language-model pre-training steps of the smoke-test decoder.")
@click.option("--device", default="auto", show_default=True, metavar="auto|cpu|cuda|cuda:N",
              help="Where the decoder trains and generates (auto: the first GPU torch sees, else the CPU).")
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True,
              help="fp32 is deterministic (the protocol); bf16 is the fast mode.")
@click.option("--quiet", is_flag=True, help="No progress bars (they are off anyway when stdout is not a terminal).")
def demo(out: Path, max_steps: int, decoder_steps: int, device: str, precision: str, quiet: bool) -> None:
    """Run the offline demo end to end and print its leaderboard (a few minutes on a CPU)."""
    from evaluator.cores import settle_openmp

    settle_openmp()  # before anything imports torch
    from evaluator.cli.leaderboard import build_table, render_md
    from evaluator.compute import resolve_device
    from evaluator.data import generate_demo, get_track, iter_clips
    from evaluator.resources import template_dir
    from evaluator.runner import PREDICTIONS_DIR, RunOptions, run_submission
    from evaluator.scoring import leaderboard, parse_results
    from evaluator.smoke_decoder import build_smoke_decoder
    from evaluator.submission.build import build

    kind = resolve_device(device).type  # fails here, before any work, when the device is not usable
    out = out.resolve()
    data_home = out / "data"
    submission = out / "submission.tar"
    if not submission.exists():
        click.echo("Building the template submission (log-mel baseline, no pretrained weights)")
        folder = out / "encoder"
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(template_dir() / "onnx", folder)
        result = build(folder, submission, step=lambda msg: click.echo(f"  - {msg}"))
        click.echo(f"  - {result.output.name}: {result.size / 1024:.0f} KiB, sha256 {result.sha256[:12]}")

    tracks = {}
    for name in DEMO_TRACKS:
        if not (data_home / name / "DONE").exists():
            click.echo(f"Generating {name} with espeak-ng and sox")
            generate_demo(name, data_home / name)
            (data_home / name / "DONE").write_text("ok\n")
        tracks[name] = get_track(name, data_home=data_home)

    decoder = out / "smoke-decoder"
    if not (decoder / "config.json").exists():
        click.echo("Building the smoke-test decoder (tiny Llama, pre-trained on the demo texts; NOT SmolLM2)")
        texts = []
        for track in tracks.values():
            for task in track.train_tasks:
                texts += [t for clip in iter_clips(task, "train", data_home=data_home, download=False)
                          for t in clip.targets]
        build_smoke_decoder(texts, decoder, steps=decoder_steps, progress=not quiet)

    outcomes = {}
    for name, track in tracks.items():
        click.echo(f"\n== {name} ==")
        opts = RunOptions(out=out / "runs", decoder=str(decoder), max_steps=max_steps, data_home=data_home,
                          download=False, progress=not quiet, machine=f"demo-{kind}",
                          device=device, precision=precision)
        outcomes[name] = run_submission(submission, track, opts, echo=click.echo)

    results = [parse_results(o.document) for o in outcomes.values()]
    header, body = build_table(leaderboard(results))
    click.echo("\nLeaderboard (smoke-test decoder, demo data):\n")
    click.echo(render_md(header, body))
    click.echo("\nChance level of each task (majority answer of its test set):")
    for name, track in tracks.items():
        for task in track.eval_tasks:
            chance = _chance(task, outcomes[name].run_dir / PREDICTIONS_DIR / f"{task.id}.jsonl")
            click.echo(f"  - {name}/{task.id}: {task.metric} {100 * chance:.1f}")
    from evaluator.report import build_site

    site = build_site([o.results_path for o in outcomes.values()], out / "site", title="XARES-LLM demo results")
    click.echo(f"\nSite: {site} (open it in a browser: plots, per-task answers, the training curve)")


def _chance(task, predictions: Path) -> float:
    """The demo's bar, from the references in the run's own predictions file (no audio is read again)."""
    from evaluator.metrics import chance_level

    refs = [json.loads(line)["references"] for line in predictions.read_text().splitlines() if line]
    return chance_level(task.metric, refs, **task.metric_args)
