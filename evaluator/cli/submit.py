"""``xares-submit init|build|validate``: the participant's commands (``validate`` is also ``xares-eval validate``).

Thin wrappers: the work is in `evaluator.submission`. Errors are `SubmissionError`s, which the group
prints as one line plus one line per reason (exit 1); bad usage exits 2.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import click

from evaluator.errors import SubmissionError
from evaluator.submission.archive import DEFAULT_MAX_BYTES

_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def _step(message: str) -> None:
    click.echo(message, err=True)


def parse_size(text: str) -> int:
    """'500M', '2G', '123456' -> bytes (binary units)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)i?B?\s*", text, re.IGNORECASE)
    if not m:
        raise click.BadParameter(f"{text!r} is not a size like 500M or 2G")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()])


@click.command(
    epilog="""\b
Examples:
  xares-submit init my_encoder --kind onnx       # baseline log-mel encoder.py + manifest.json
  xares-submit init my_encoder --kind container  # Dockerfile + entrypoint template
""",
)
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--kind",
    type=click.Choice(["onnx", "container"]),
    default="onnx",
    show_default=True,
    help="onnx: a torch *Encoder exported to ONNX (or your own .onnx); container: a Docker image.",
)
@click.option(
    "--force", is_flag=True, help="Write into DIRECTORY even if it is not empty (overwrites template files)."
)
def init(directory: Path, kind: str, force: bool) -> None:
    """Write a ready-to-edit submission folder to DIRECTORY from the template.

    The ONNX template is a working baseline (log-mel filterbank frames, 50 frames/s, no weights):
    replace the body of encoder.py with your model, edit manifest.json, then run build.
    """
    from evaluator.resources import template_dir

    source = template_dir() / kind
    if not source.is_dir():
        raise SubmissionError(f"the {kind} template is missing from this installation ({source})")
    if directory.exists() and any(directory.iterdir()) and not force:
        raise click.UsageError(f"{directory} exists and is not empty (use --force to write into it)")
    shutil.copytree(
        source, directory, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
    )
    files = sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())
    click.echo(f"Wrote the {kind} submission template to {directory}:")
    for f in files:
        click.echo(f"  - {f}")
    click.echo(f"Next: edit it, then `xares-submit build {directory} -o submission.tar`")


@click.command(
    epilog="""\b
Examples:
  xares-submit build my_encoder -o submission.tar --team my-lab
  xares-submit build onnx_folder --source onnx --max-size 1G
\b
DIRECTORY holds one of:
  encoder.py   one torch *Encoder (output_dim; forward(audio, audio_attention_mask) -> (features, mask))
  model.onnx   with manifest.json (output_dim, frame hop and I/O names are filled in when left out)
  Dockerfile   an image implementing the extract protocol (see the container template)
""",
)
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("submission.tar"),
    show_default=True,
    help="Archive to write (only written when every check passes).",
)
@click.option("--team", help="Team name (overrides manifest.json; default 'unknown').")
@click.option("--name", help="Encoder name (overrides manifest.json; default: the folder name).")
@click.option(
    "--source",
    type=click.Choice(["auto", "torch", "onnx", "container"]),
    default="auto",
    show_default=True,
    help="What to build from, when the folder holds several.",
)
@click.option(
    "--max-size",
    default=f"{DEFAULT_MAX_BYTES >> 30}G",
    show_default=True,
    help="Refuse an archive bigger than this (bytes, or with K/M/G binary units).",
)
def build(
    directory: Path, output: Path, team: str | None, name: str | None, source: str, max_size: str
) -> None:
    """Build DIRECTORY into a submission archive, after running the organizer's probe on it.

    The encoder is exported (torch) or loaded (ONNX) or built (Docker), run on clips from 0.1 s to
    30 s alone and in padded batches, and refused with one line per failing check.
    """
    from evaluator.submission.build import BuildOptions
    from evaluator.submission.build import build as run_build

    options = BuildOptions(team=team, name=name, source=source, max_bytes=parse_size(max_size))
    result = run_build(directory, output, options, step=_step)
    for note in result.notes:
        click.echo(f"  - {note}", err=True)
    _print_probe(result.probe)
    m = result.manifest
    click.echo(
        f"Wrote {result.output} ({result.size / (1 << 20):.1f} MiB, sha256 {result.sha256}): {m.name} by {m.team}, "
        f"{m.kind}, D={m.output_dim}, {m.describe_frames()}"
    )


@click.command(
    epilog="""\b
Examples:
  xares-submit validate submission.tar
  xares-eval validate submission.tar    # the same checks, from the organizer's tool
\b
Exit status: 0 valid, 1 invalid (one line per reason), 2 usage error, 3 missing host tools.
""",
)
@click.argument("archive", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Unpack into a temporary folder here (default: the system temp dir); it is always removed.",
)
@click.option("--time-limit", type=click.FloatRange(min=0.01), default=10.0, show_default=True,
              help="Time budget of the probe and of each extraction: wall-clock seconds per audio-second given to "
                   "the encoder, on top of --time-floor; the encoder is killed when it runs out.")
@click.option("--time-floor", type=click.FloatRange(min=1), default=300.0, show_default=True,
              help="Seconds every time budget starts with.")
def validate(archive: Path, workdir: Path | None, time_limit: float, time_floor: float) -> None:
    """Check ARCHIVE offline with exactly the organizer's checks.

    Safe unpack (no links, devices, absolute or '..' paths, size and compression-bomb limits),
    manifest schema, checksums of every file, then the probe. Nothing is written outside a
    temporary folder.
    """
    from evaluator.submission.validate import ValidateOptions
    from evaluator.submission.validate import validate as run_validate

    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
    from evaluator.sandbox.base import TimeBudget
    from evaluator.submission.probe import ProbeConfig

    budget = TimeBudget(seconds_per_audio_second=time_limit, floor_seconds=time_floor)
    report = run_validate(archive, ValidateOptions(workdir=workdir, probe=ProbeConfig(time_budget=budget)), step=_step)
    _print_probe(report.probe)
    m = report.manifest
    click.echo(
        f"{archive} is valid: {m.name} by {m.team} ({m.kind}, D={m.output_dim}, {m.describe_frames()})"
    )


def _print_probe(report) -> None:
    for check in report.checks:
        click.echo(f"  - {check.name}: {check.detail}", err=True)
    peak = f"{report.feature_peak:.3g}" if report.feature_peak is not None else "n/a"
    cost = (f"; encoding without padding costs {report.unbatched_cost:.2g}x the batched time"
            if report.batching != "padded" and report.unbatched_cost else "")
    click.echo(f"  - measured: peak |feature| {peak} -> stored as {report.feature_dtype}; "
               f"batching {report.batching}{cost}", err=True)
