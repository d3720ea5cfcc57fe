"""Run a participant's encoder behind the `Runtime` interface, whatever the submission kind.

``open_runtime(root, manifest, limits)`` picks the implementation from ``manifest.kind``: an ONNX graph
runs in onnxruntime (`evaluator.sandbox.onnx_runtime`), a container image under Docker
(`evaluator.sandbox.docker_runtime`, imported only when needed so ONNX users never import the Docker SDK).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from evaluator.errors import SubmissionError
from evaluator.sandbox.base import Limits, Runtime

if TYPE_CHECKING:  # evaluator.submission imports this package: no runtime import back
    from evaluator.submission.manifest import Manifest

__all__ = ["Limits", "Runtime", "open_runtime"]


def open_runtime(root: Path, manifest: Manifest, limits: Limits) -> Runtime:
    """Start the encoder of an unpacked, verified submission.

    Args:
        root: the folder holding manifest.json and the payload.
        manifest: the submission's manifest.
        limits: resource caps for the encoder.

    Returns:
        A started `Runtime`; use it as a context manager so it is always closed.

    Raises:
        SubmissionError: the payload cannot be loaded or does not match the manifest.
        EnvironmentUnavailable: the host lacks what the runtime needs (Docker engine, GPU).
    """
    if manifest.kind == "onnx":
        from evaluator.sandbox.onnx_runtime import OnnxRuntime

        return OnnxRuntime(Path(root), manifest, limits)
    if manifest.kind == "container":
        from evaluator.sandbox.docker_runtime import ContainerRuntime

        return ContainerRuntime(Path(root), manifest, limits)
    raise SubmissionError(f"unknown submission kind {manifest.kind!r}; expected 'onnx' or 'container'")
