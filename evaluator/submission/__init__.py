"""The participant's side of the contract: build, pack, unpack safely, verify and probe a submission.

Public surface: `Manifest`, `build`, `validate`, `pack`, `safe_unpack`, `verify_unpacked`, `run_probe`
and their option/report dataclasses. torch and onnxruntime load only when an encoder is exported or run.
"""

from __future__ import annotations

from evaluator.submission.archive import UnpackLimits, pack, safe_unpack, verify_unpacked
from evaluator.submission.build import BuildOptions, BuildResult, build
from evaluator.submission.manifest import Manifest
from evaluator.submission.probe import ProbeConfig, ProbeReport, run_probe
from evaluator.submission.validate import ValidateOptions, ValidationReport, validate

__all__ = [
    "BuildOptions",
    "BuildResult",
    "Manifest",
    "ProbeConfig",
    "ProbeReport",
    "UnpackLimits",
    "ValidateOptions",
    "ValidationReport",
    "build",
    "pack",
    "run_probe",
    "safe_unpack",
    "validate",
    "verify_unpacked",
]
