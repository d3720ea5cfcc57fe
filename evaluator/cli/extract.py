"""``xares-eval extract``: run a submission's encoder over data shards into the feature store.

Example::

    xares-eval extract submission.tar --data 'shards/esc50_fold_{1..4}_0000000.tar.gz' --out features/
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from evaluator.features import DTYPES, FeatureStore, StoreKey

GENERIC_LABEL_KEYS = "text;caption;captions;label;labels"  # XARES-LLM's usual order for a task's json


@click.command(
    epilog="""\b
Examples:
  xares-eval extract submission.tar --data 'data/ESC-50/test/*.tar.gz' --out features/
  xares-eval extract submission.tar --data a.tar.gz --data b.tar.gz --out features/ \\
      --task esc-50 --split train --spot-check 0.02
  xares-eval extract submission.tar --data 'x_0000{00..03}.tar.gz' --out features/ --dtype float32

\b
Running it again with the same submission, data and settings reuses the store: 0 encoder calls.
An interrupted run resumes where it stopped.""",
)
@click.argument("submission", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--data", "patterns", multiple=True, required=True, metavar="SHARD_OR_GLOB",
              help="Webdataset shard (.tar/.tar.gz of <key>.<audio> + <key>.json), glob or {a..b} pattern; "
                   "repeat for more.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Feature store root, shared by submissions, tasks and splits (one folder per key inside).")
@click.option("--task", default="shards", show_default=True, help="Task name recorded in the store key.")
@click.option("--split", type=click.Choice(["train", "test"]), default="test", show_default=True,
              help="Split name recorded in the store key.")
@click.option("--label-keys", default=GENERIC_LABEL_KEYS, show_default=True,
              help="JSON keys tried in order for a clip's targets (';'-separated).")
@click.option("--dtype", "--feature-dtype", "dtype", type=click.Choice(("auto", *DTYPES)), default="auto",
              show_default=True,
              help="Storage dtype of the features (auto: the build's measured choice, float16 when the range fits).")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the first N clips (default: all).")
@click.option("--batch-clips", type=click.IntRange(min=1), default=16, show_default=True,
              help="Most clips (or windows) per encoder call.")
@click.option("--spot-check", "spot_fraction", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Share of stored clips to re-extract and compare (0 = none); a difference fails the run.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the spot-check sample.")
@click.option("--memory-mb", type=click.IntRange(min=64), default=None,
              help="Encoder memory cap in MiB (default: the manifest's resources.memory_mb).")
@click.option("--cpus", type=click.FloatRange(min=0.1), default=2.0, show_default=True, help="Encoder CPU cores.")
@click.option("--wall-seconds", type=click.FloatRange(min=1), default=600.0, show_default=True,
              help="Wall-clock limit per encoder call, in seconds.")
@click.option("--gpu/--no-gpu", default=False, show_default=True,
              help="Run the encoder on a GPU (fails with a message when none is usable).")
@click.option("--time-limit", type=click.FloatRange(min=0.01), default=10.0, show_default=True,
              help="Time budget of the probe and of each extraction: wall-clock seconds per audio-second given to "
                   "the encoder, on top of --time-floor; the encoder is killed when it runs out.")
@click.option("--time-floor", type=click.FloatRange(min=1), default=300.0, show_default=True,
              help="Seconds every time budget starts with.")
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the submission is unpacked (default: a temporary folder, removed afterwards).")
def extract(submission: Path, patterns: tuple[str, ...], out: Path, task: str, split: str, label_keys: str,
            dtype: str, limit: int | None, batch_clips: int, spot_fraction: float, seed: int,
            memory_mb: int | None, cpus: float, wall_seconds: float, gpu: bool, time_limit: float, time_floor: float,
            work_dir: Path | None) -> None:
    """Extract features of SUBMISSION (a submission.tar) for every clip of the --data shards.

    The submission is unpacked safely and verified, its encoder runs in the sandbox, every output is
    checked against the manifest, and features are stored once (float16 by default) under --out, in a
    folder keyed by the submission's sha256, the shards' digests and the settings.
    """
    from evaluator.data.cache import shard_digests
    from evaluator.data.shards import SkipReport, iter_clips
    from evaluator.data.specs import TaskSpec
    from evaluator.extraction import ExtractionConfig, reused_report
    from evaluator.extraction import extract as run_extraction
    from evaluator.sandbox import Limits, open_runtime
    from evaluator.sandbox.base import TimeBudget
    from evaluator.submission.archive import unpacked

    keys = tuple(k.strip() for k in label_keys.split(";") if k.strip())
    patterns = tuple(_absolute(p) for p in patterns)
    spec = TaskSpec(id=task, name=task, track="adhoc", train_shards=patterns, test_shards=patterns,
                    train_keys=keys, eval_keys=keys)

    click.echo(f"Checking {submission.name}")
    with unpacked(submission, workdir=work_dir) as sub:
        root, manifest, sub_sha = sub.root, sub.manifest, sub.sha256
        click.echo(f"  - {manifest.name} by {manifest.team}: {manifest.kind}, D = {manifest.output_dim}, "
                   f"{manifest.describe_frames()}, windows of {manifest.max_audio_seconds:g} s")
        click.echo(f"  - sha256 {sub_sha}")

        digests = shard_digests(spec, split, download=False)
        # what the build measured (schema 2): batching of a padding-sensitive encoder, range, fixed frames
        measured = manifest.measured
        batching = measured.get("batching", "padded")
        if dtype == "auto":
            dtype = measured.get("feature_dtype", "float16")
        settings = [("label_keys", ";".join(keys))] + ([("limit", str(limit))] if limit else [])
        if batching != "padded":
            settings.append(("batching", batching))
        key = StoreKey.for_shards(sub_sha, digests, task=task, split=split, dtype=dtype,
                                  window_seconds=manifest.max_audio_seconds, settings=tuple(settings))
        store = FeatureStore.open(out, key)
        click.echo(f"Features of {len(digests)} shard{'s' if len(digests) != 1 else ''}: {store.path}")

        limits = Limits(memory_mb=memory_mb or manifest.resources.memory_mb, cpus=cpus,
                        wall_seconds=wall_seconds, gpu=gpu)
        config = ExtractionConfig(batch_clips=batch_clips, batching=batching,
                                  time_budget=TimeBudget(seconds_per_audio_second=time_limit, floor_seconds=time_floor),
                                  fixed_frames=measured.get("fixed_frames") if manifest.fixed_frames else None)
        skips = SkipReport(task=task, split=split)
        check = None
        if store.complete and spot_fraction == 0:
            report = reused_report(store)  # same key, complete: the encoder is not even started
        else:
            with open_runtime(root, manifest, limits) as runtime:
                click.echo(f"  - runtime: {runtime.name} on {runtime.device}; {runtime.isolation}")
                with _Progress() as tick:
                    clips = iter_clips(spec, split, report=skips, download=False, limit=limit)
                    report = run_extraction(runtime, clips, store, manifest, config, progress=tick)
                if spot_fraction > 0:
                    check = _spot_check(runtime, spec, split, store, manifest, config, spot_fraction, seed)

    if report.reused:
        click.echo(f"  - clips: {report.clips} stored, {report.failed} failed (scored as wrong); reused, "
                   "nothing encoded")
    else:
        click.echo(f"  - data: {skips.summary()}")
        for line in skips.lines()[1:]:
            click.echo(f"    {line.strip()}")
        click.echo(f"  - clips: {report.clips} stored, {report.failed} failed (scored as wrong), "
                   f"{report.encoded} encoded now, {report.resumed} from an interrupted run")
        click.echo(f"  - audio: {report.audio_seconds:.1f} s in {report.wall_seconds:.1f} s = "
                   f"{report.audio_seconds_per_second:.1f} audio-seconds per second"
                   + (f" ({report.windowed} long clips in windows)" if report.windowed else ""))
    click.echo(f"  - stored: {report.bytes_stored / 2**20:.2f} MiB ({dtype})")
    click.echo(f"  - encoder calls: {report.encoder_calls}")
    if check is not None:
        click.echo(f"  - spot check: {len(check.checked)} clips re-extracted ({check.encoder_calls} encoder calls), "
                   f"max |diff| {check.max_abs_diff:.3g}: ok")
    click.echo(f"Reused {store.path}" if report.reused else f"Done: {store.path}")


def _spot_check(runtime, spec, split, store, manifest, config, fraction, seed):
    from evaluator.data.shards import clips_by_key
    from evaluator.extraction import sample_keys, spot_check

    wanted = sample_keys(store, fraction=fraction, seed=seed)
    clips = clips_by_key(spec, split, wanted)
    return spot_check(runtime, clips, store, manifest, fraction=fraction, seed=seed, config=config)


def _absolute(pattern: str) -> str:
    return pattern if Path(pattern).is_absolute() else str(Path.cwd() / pattern)


class _Progress:
    """A rich progress line on stderr (clips and audio-seconds so far); silent when not a terminal."""

    def __enter__(self):
        from rich.console import Console
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self._bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                             console=Console(stderr=True), transient=True, disable=not sys.stderr.isatty())
        self._bar.__enter__()
        self._task = self._bar.add_task("extracting", total=None)
        return self.tick

    def tick(self, clips: int, seconds: float) -> None:
        self._bar.update(self._task, description=f"extracting: {clips} clips, {seconds:.0f} audio-s")

    def __exit__(self, *exc):
        self._bar.__exit__(*exc)
