"""The submission manifest (``manifest.json``) as a frozen dataclass.

The JSON schema (``schemas/submission.schema.json``) is the contract; this module only turns a
schema-valid document into typed fields so later stages never index raw dicts.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from evaluator.errors import SubmissionError
from evaluator.fileio import UnsafeInput, parse_json
from evaluator.resources import validate_document

MANIFEST_NAME = "manifest.json"
CHECKSUMS_NAME = "SHA256SUMS"
BUILD_REPORT_NAME = "build_report.json"
SAMPLE_RATE = 16000  # Hz; the only rate the contract allows
SCHEMA_VERSION = 2  # what build writes; version 1 manifests stay valid (frames = follows_audio)
FOLLOWS_AUDIO, FIXED = "follows_audio", "fixed"  # `frames`: T grows with the clip, or is the same for every clip


@dataclass(frozen=True)
class PayloadFile:
    path: str
    sha256: str
    size: int  # bytes


@dataclass(frozen=True)
class OnnxSpec:
    model: str  # path inside the submission
    audio_input: str  # [B, S] float32
    features_output: str  # [B, T, D]
    mask_input: str | None = None  # [B, S] sample mask, or None
    mask_output: str | None = None  # [B, T] frame mask, or None (all frames valid)


@dataclass(frozen=True)
class ContainerSpec:
    image: str  # path of the `docker save` archive inside the submission
    image_id: str  # sha256:<64 hex>, the image is run by this id
    entrypoint: tuple[str, ...]


@dataclass(frozen=True)
class Resources:
    gpu: bool = False
    memory_mb: int = 4096


@dataclass(frozen=True)
class Manifest:
    name: str
    team: str
    kind: str  # "onnx" | "container"
    output_dim: int
    frame_hop_ms: float | None  # None only when frames is "fixed"
    max_audio_seconds: float
    output_dtype: str  # "float32" | "float16"
    files: tuple[PayloadFile, ...] = ()
    onnx: OnnxSpec | None = None
    container: ContainerSpec | None = None
    resources: Resources = field(default_factory=Resources)
    license: str = ""
    description: str = ""
    sample_rate: int = SAMPLE_RATE
    schema_version: int = 1
    frames: str = FOLLOWS_AUDIO  # "follows_audio" | "fixed" (version 2)
    weights_dtype: str = "float32"  # ONNX weights of an encoder.py export (version 2)
    measured: dict = field(default_factory=dict)  # what the build measured; informational (version 2)

    @property
    def fixed_frames(self) -> bool:
        """Every clip gives the same number of frames, whatever its length (Whisper's 1500, a clip vector)."""
        return self.frames == FIXED

    @property
    def frames_per_second(self) -> float | None:
        return None if self.frame_hop_ms is None else 1000.0 / self.frame_hop_ms

    def describe_frames(self) -> str:
        """'50 frames/s' or 'a fixed 1500 frames per clip' (for status lines)."""
        if self.fixed_frames:
            n = self.measured.get("fixed_frames")
            return f"a fixed {n} frames per clip" if n else "a fixed number of frames per clip"
        return f"{self.frames_per_second:g} frames/s"

    @classmethod
    def from_dict(cls, doc: object) -> Manifest:
        """Validate against the schema and build. Raises SubmissionError listing every violation."""
        validate_document(doc, "submission", what="manifest.json", error=SubmissionError)
        assert isinstance(doc, dict)
        problems = _number_problems(doc)
        if problems:
            raise SubmissionError("manifest.json does not match submission.schema.json", reasons=problems)
        d = dict(doc)
        d["files"] = tuple(PayloadFile(**f) for f in d.get("files", []))
        if "onnx" in d:
            d["onnx"] = OnnxSpec(**d["onnx"])
        if "container" in d:
            c = dict(d["container"])
            c["entrypoint"] = tuple(c["entrypoint"])
            d["container"] = ContainerSpec(**c)
        if "resources" in d:
            d["resources"] = Resources(**d["resources"])
        d.setdefault("frame_hop_ms", None)
        return cls(**d)

    @classmethod
    def load(cls, path: Path) -> Manifest:
        try:
            doc = parse_json(Path(path).read_bytes())
        except FileNotFoundError as e:
            raise SubmissionError(f"no {MANIFEST_NAME} in the submission ({path})") from e
        except UnsafeInput as e:
            raise SubmissionError(f"{MANIFEST_NAME} is not valid JSON: {e}") from e
        return cls.from_dict(doc)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["files"] = [asdict(f) for f in self.files]
        for key in ("onnx", "container"):
            if d[key] is None:
                del d[key]
        if self.schema_version < 2:  # keep a version 1 manifest what it was
            for key in ("frames", "weights_dtype", "measured"):
                del d[key]
        if d["frame_hop_ms"] is None:
            del d["frame_hop_ms"]
        if d.get("container"):
            d["container"]["entrypoint"] = list(d["container"]["entrypoint"])
        return d


def _number_problems(doc: dict) -> list[str]:
    """What JSON Schema lets through but the code cannot use: 80.0 is an "integer" to the schema, and a
    dict built in Python may hold NaN or infinity."""
    ints = [("output_dim", doc.get("output_dim"))]
    ints += [("resources/memory_mb", (doc.get("resources") or {}).get("memory_mb"))]
    ints += [(f"files/{i}/size", f.get("size")) for i, f in enumerate(doc.get("files") or []) if isinstance(f, dict)]
    problems = [f"{where}: {value!r} is not an integer" for where, value in ints
                if value is not None and (isinstance(value, bool) or not isinstance(value, int))]
    for where in ("frame_hop_ms", "max_audio_seconds"):
        value = doc.get(where)
        if isinstance(value, float) and not math.isfinite(value):
            problems.append(f"{where}: {value!r} is not a finite number")
    return problems
