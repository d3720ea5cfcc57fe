"""``xares-submit validate``: the organizer's checks, run offline on a ``submission.tar``.

Steps, each refusing with one line per problem: safe unpack into a fresh temporary folder (hostile
members, sizes, bombs), manifest schema, checksums (every file listed, none extra, sizes and sha256),
then the probe through the same `Runtime` the organizer uses. The temporary folder is always removed
and nothing is written anywhere else.

Example::

    report = validate(Path("submission.tar"))
    print(report.manifest.name, report.probe.seconds_per_audio_second)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from evaluator.errors import SubmissionError
from evaluator.sandbox import open_runtime
from evaluator.sandbox.base import Limits
from evaluator.submission.archive import UnpackLimits, unpacked
from evaluator.submission.manifest import Manifest
from evaluator.submission.probe import ProbeConfig, ProbeReport, run_probe


@dataclass(frozen=True)
class ValidateOptions:
    unpack: UnpackLimits = field(default_factory=UnpackLimits)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    limits: Limits | None = None  # None: defaults, with memory from the manifest's resources.memory_mb
    workdir: Path | None = None  # parent of the temporary folder (default: the system temp dir)


@dataclass(frozen=True)
class ValidationReport:
    archive_sha256: str
    manifest: Manifest
    probe: ProbeReport


def validate(
    archive: Path,
    options: ValidateOptions = ValidateOptions(),
    *,
    step: Callable[[str], None] = lambda msg: None,
) -> ValidationReport:
    """Check a submission archive exactly as the organizer will.

    Args:
        archive: the ``submission.tar``.
        options: unpack limits, probe settings, runtime limits, where to unpack.
        step: called with a short line as each stage starts.

    Returns:
        A `ValidationReport` when every check passes.

    Raises:
        SubmissionError: the first failing stage, with one reason per problem.
        EnvironmentUnavailable: the runtime the submission needs is missing (Docker, GPU).
    """
    archive = Path(archive)
    with unpacked(archive, options.unpack, workdir=options.workdir, step=step) as sub:
        manifest, digest = sub.manifest, sub.sha256
        limits = options.limits or Limits(memory_mb=manifest.resources.memory_mb)
        step(f"Probing the encoder ({manifest.kind}) with the organizer's checks")
        with open_runtime(sub.root, manifest, limits) as runtime:
            report = run_probe(runtime, manifest, options.probe)
    if not report.ok:
        raise SubmissionError(f"{archive.name} fails {len(report.reasons)} check(s)", reasons=report.reasons)
    return ValidationReport(archive_sha256=digest, manifest=manifest, probe=report)
