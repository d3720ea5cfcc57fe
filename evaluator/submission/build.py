"""``xares-submit build``: turn a participant's folder into ``submission.tar``.

Three kinds of folder are accepted (picked automatically, or forced with ``source``):

* ``torch``: an ``encoder.py`` defining one XARES-LLM-style ``*Encoder`` -> exported to ``model.onnx``;
* ``onnx``: a ``model.onnx`` (or the file ``manifest.json``'s ``onnx.model`` names);
* ``container``: a ``Dockerfile`` implementing the extract protocol -> ``docker save`` archive.

A ``manifest.json`` in the folder may be partial: what it leaves out is derived (name from the folder,
output_dim and frame hop measured, I/O names read from the graph, ``files`` computed). The encoder is
then started through the same `Runtime` the organizer uses, the probe runs, and only a submission that
passes every check is packed.

Example::

    build(Path("my_encoder"), Path("submission.tar"), BuildOptions(team="my-lab"))
"""

from __future__ import annotations

import json
import logging
import platform
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from evaluator.errors import SubmissionError
from evaluator.fileio import UnsafeInput, parse_json, sha256_file
from evaluator.sandbox import open_runtime
from evaluator.sandbox.base import Limits
from evaluator.submission.archive import DEFAULT_MAX_BYTES, pack
from evaluator.submission.manifest import (
    BUILD_REPORT_NAME,
    FIXED,
    MANIFEST_NAME,
    SAMPLE_RATE,
    SCHEMA_VERSION,
    Manifest,
)
from evaluator.submission.probe import ProbeConfig, ProbeReport, run_probe

log = logging.getLogger(__name__)

SOURCES = ("auto", "torch", "onnx", "container")
DEFAULT_ONNX = "model.onnx"
IMAGE_NAME = "image.tar"
DEFAULTS = {  # manifest fields a folder may leave out
    "schema_version": SCHEMA_VERSION,
    "team": "unknown",
    "sample_rate": SAMPLE_RATE,
    "max_audio_seconds": 30,
    "output_dtype": "float32",
    "license": "",
    "description": "",
}


@dataclass(frozen=True)
class BuildOptions:
    """Choices for one build (CLI flags map one to one)."""

    team: str | None = None  # overrides manifest.json's team
    name: str | None = None  # overrides manifest.json's name (default: the folder name)
    source: str = "auto"  # "auto" | "torch" | "onnx" | "container"
    max_bytes: int = DEFAULT_MAX_BYTES  # refuse a bigger submission.tar
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    limits: Limits | None = None  # None: defaults, with memory from the manifest's resources.memory_mb (as validate)

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {self.source!r}")


@dataclass(frozen=True)
class BuildResult:
    output: Path
    manifest: Manifest
    probe: ProbeReport
    sha256: str  # of the tar
    size: int  # bytes of the tar
    notes: tuple[str, ...]  # what was derived rather than declared


def detect_source(folder: Path, partial: dict) -> str:
    """Which kind of folder this is; refuses ambiguous folders rather than guessing.

    Raises:
        SubmissionError: nothing to build, or more than one candidate.
    """
    onnx_name = (partial.get("onnx") or {}).get("model", DEFAULT_ONNX)
    found = {
        "torch": (folder / "encoder.py").is_file(),
        "onnx": (folder / onnx_name).is_file(),
        "container": (folder / "Dockerfile").is_file(),
    }
    hits = [k for k, v in found.items() if v]
    if len(hits) == 1:
        return hits[0]
    if not hits:
        raise SubmissionError(
            f"{folder} has nothing to build: expected encoder.py (torch *Encoder), {onnx_name} with "
            "manifest.json, or a Dockerfile (start from `xares-submit init DIR --kind onnx|container`)"
        )
    raise SubmissionError(
        f"{folder} holds several encoders ({', '.join(hits)}); choose one with --source {'|'.join(hits)}"
    )


def read_partial_manifest(folder: Path) -> dict:
    """The folder's manifest.json as a dict ({} when absent); it may omit derived fields.

    Raises:
        SubmissionError: the file is not a JSON object.
    """
    path = folder / MANIFEST_NAME
    if not path.is_file():
        return {}
    try:
        doc = parse_json(path.read_bytes())
    except UnsafeInput as e:
        raise SubmissionError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(doc, dict):
        raise SubmissionError(f"{path} must hold a JSON object")
    return doc


def _safe_name(text: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-._")[:64]
    return name or "encoder"


def build(
    folder: Path,
    output: Path,
    options: BuildOptions = BuildOptions(),
    *,
    step: Callable[[str], None] = lambda msg: None,
) -> BuildResult:
    """Build, probe and pack a submission.

    Args:
        folder: the participant's folder.
        output: the tar to write (only written when every check passes).
        options: team/name overrides, source kind, size cap, probe settings and limits.
        step: called with a short line as each stage starts (the CLI prints them).

    Returns:
        A `BuildResult` describing the written archive.

    Raises:
        SubmissionError: the folder cannot be built, or the built encoder fails checks (one reason
            per failing check).
    """
    folder = Path(folder).resolve()
    if not folder.is_dir():
        raise SubmissionError(f"{folder} is not a folder")
    partial = read_partial_manifest(folder)
    source = options.source if options.source != "auto" else detect_source(folder, partial)
    notes: list[str] = []
    reasons: list[str] = []
    extra: dict = {"source": source}

    with tempfile.TemporaryDirectory(prefix="xares-build-") as tmp:
        staging = Path(tmp) / "submission"
        staging.mkdir()
        if source == "torch":
            derived = _stage_torch(folder, staging, partial, reasons, notes, extra, step)
        elif source == "onnx":
            derived = _stage_onnx(folder, staging, partial, notes, step)
        else:
            derived = _stage_container(folder, Path(tmp), staging, partial, step, options)
        manifest = _complete_manifest(folder, partial, derived, options, notes)

        step(f"Probing the encoder ({manifest.kind}) with the organizer's checks")
        limits = options.limits or Limits(memory_mb=manifest.resources.memory_mb)
        with open_runtime(staging, manifest, limits) as runtime:
            report = run_probe(runtime, manifest, options.probe)
        reasons += report.reasons
        if reasons:
            raise SubmissionError(
                f"{folder.name} fails {len(reasons)} check(s); nothing was written", reasons=reasons
            )
        if manifest.schema_version >= 2:  # a version 1 manifest stays exactly what its author wrote
            manifest = replace(manifest, measured=report.measured())

        doc = {
            "schema_version": 1,
            "tool": "xares-submit build",
            "python": platform.python_version(),
            "platform": platform.platform(),
            "derived": notes,
            **extra,
            "measured": report.measured(),
            "probe": report.to_dict(),
        }
        (staging / BUILD_REPORT_NAME).write_text(json.dumps(doc, indent=2) + "\n")
        step(f"Packing {output}")
        manifest = pack(staging, manifest, Path(output), max_bytes=options.max_bytes)
    output = Path(output)
    return BuildResult(
        output=output,
        manifest=manifest,
        probe=report,
        sha256=sha256_file(output),
        size=output.stat().st_size,
        notes=tuple(notes),
    )


def _stage_torch(folder, staging, partial, reasons, notes, extra, step) -> dict:
    from evaluator.submission.export import export_encoder, measure_output
    from evaluator.submission.provenance import copy_sources

    weights_dtype = partial.get("weights_dtype", "float32")
    step(f"Exporting encoder.py to ONNX (eval mode, dynamic batch and time axes, {weights_dtype} weights)")
    model = staging / DEFAULT_ONNX
    result = export_encoder(folder / "encoder.py", model, weights_dtype=weights_dtype)
    reasons += list(result.reasons)
    # provenance, never executed: every file of the folder the export imported or read, within caps
    copied = copy_sources(folder, result.source_files, staging / "source")
    extra.update(
        encoder_class=result.class_name,
        exporter=result.exporter,
        onnx_vs_torch=result.max_rel_diff,
        weights_dtype=result.weights_dtype,
        weights_bytes=result.weights_bytes,
        external_data=list(result.external_data),
        float16_rounding=result.rounding_rel_diff,  # torch features, float16-rounded vs float32 weights
        source_files=copied.to_dict(),
    )
    notes.append(f"model.onnx exported from {result.class_name} with the {result.exporter} exporter")
    if result.external_data:
        notes.append(
            f"weights ({result.weights_bytes / 2**30:.2f} GiB) written as external data beside model.onnx: "
            + ", ".join(result.external_data)
        )
    if result.rounding_rel_diff is not None:
        notes.append(f"weights stored as float16: features move by {result.rounding_rel_diff:.2g} (relative)")
    for item in copied.left_out:
        notes.append(f"source/ leaves out {item['path']} ({item['bytes']} bytes): {item['why']}")
    derived = {"kind": "onnx", "output_dim": result.output_dim, "onnx": _spec_dict(result.onnx)}
    if "frame_hop_ms" not in partial:
        try:
            hop, _, _ = measure_output(model, result.onnx)
        except SubmissionError as e:  # report it with what the export already found
            raise SubmissionError(
                "the encoder fails the contract; nothing was written", reasons=[*reasons, str(e)]
            ) from e
        _set_hop(derived, hop, notes, reasons)
    return derived


def _stage_onnx(folder, staging, partial, notes, step) -> dict:
    from evaluator.sandbox.onnx_checks import check_model, external_data_files
    from evaluator.submission.export import inspect_onnx, measure_output

    declared = dict(partial.get("onnx") or {})
    rel = declared.get("model", DEFAULT_ONNX)
    src = (folder / rel).resolve()
    if not src.is_relative_to(folder) or not src.is_file():
        raise SubmissionError(f"onnx.model {rel!r} is not a file inside {folder}")
    step(f"Checking {rel}")
    check_model(folder, src)  # operator domains; external data only inside the folder, no links
    dest = staging / rel
    for name in [Path(rel).name, *external_data_files(src)]:  # the model and the weights it reads
        target = dest.parent / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src.parent / name, target)
        if name != Path(rel).name:
            notes.append(f"external data {name} packed beside {rel}")
    spec = inspect_onnx(dest, {**declared, "model": rel})
    derived = {"kind": "onnx", "onnx": _spec_dict(spec)}
    if not declared.get("audio_input") or not declared.get("features_output"):
        notes.append(f"onnx I/O names read from the graph: {_spec_dict(spec)}")
    if "frame_hop_ms" not in partial or "output_dim" not in partial or "output_dtype" not in partial:
        hop, dim, dtype = measure_output(dest, spec)
        if "output_dim" not in partial:
            derived["output_dim"] = dim
            notes.append(f"output_dim = {dim} (measured)")
        if "output_dtype" not in partial and dtype in ("float32", "float16"):
            derived["output_dtype"] = dtype
        if "frame_hop_ms" not in partial:
            _set_hop(derived, hop, notes, [])
    return derived


def _stage_container(folder, workdir, staging, partial, step, options) -> dict:
    try:
        from evaluator.submission.container import build_container_payload
    except ImportError as e:
        raise SubmissionError(
            "container builds are not available in this installation (no container module)"
        ) from e
    for key in ("frame_hop_ms", "output_dim"):
        if key not in partial and not (key == "frame_hop_ms" and partial.get("frames") == FIXED):
            raise SubmissionError(f"a container submission's manifest.json must declare {key}")
    name = options.name or partial.get("name") or _safe_name(folder.name)
    step("Building the container image (docker build, then docker save)")
    info = build_container_payload(folder, workdir / "container", tag=f"xares-submit/{name.lower()}:build")
    image = Path(info.image_tar)
    if not image.is_absolute():
        image = workdir / "container" / image
    shutil.move(str(image), staging / IMAGE_NAME)
    return {
        "kind": "container",
        "container": {"image": IMAGE_NAME, "image_id": info.image_id, "entrypoint": list(info.entrypoint)},
    }


def _spec_dict(spec) -> dict:
    d = {"model": spec.model, "audio_input": spec.audio_input, "features_output": spec.features_output}
    d["mask_input"] = spec.mask_input
    d["mask_output"] = spec.mask_output
    return d


def _set_hop(derived: dict, hop: float | None, notes: list[str], reasons: list[str]) -> None:
    if hop is None:  # the count does not grow with the audio: a fixed-frame or clip-level encoder
        derived["frames"] = FIXED
        notes.append('frames = fixed (measured: the frame count does not follow the audio length; declare '
                     '"frames": "fixed" in manifest.json if that is meant)')
        return
    derived["frame_hop_ms"] = hop
    notes.append(f"frame_hop_ms = {hop:g} (measured: {1000 / hop:.4g} frames/s)")


def _complete_manifest(folder: Path, partial: dict, derived: dict, options: BuildOptions, notes) -> Manifest:
    doc = {
        **DEFAULTS,
        **derived,
        **{k: v for k, v in partial.items() if k not in ("files", "onnx", "container", "measured")},
    }
    if doc["schema_version"] == 1 and "frames" in derived:
        raise SubmissionError('the encoder gives the same number of frames for every clip: that needs '
                              '"schema_version": 2 and "frames": "fixed" in manifest.json')
    if "onnx" in partial and "onnx" in derived:
        doc["onnx"] = {**derived["onnx"], **partial["onnx"]}
    doc["kind"] = derived["kind"]
    doc["files"] = []
    if "name" not in partial:
        doc["name"] = _safe_name(folder.name)
        notes.append(f"name = {doc['name']} (from the folder name)")
    if options.name:
        doc["name"] = options.name
    if options.team:
        doc["team"] = options.team
    if doc["team"] == "unknown":
        notes.append("team = unknown (pass --team or set it in manifest.json)")
    return Manifest.from_dict(doc)
