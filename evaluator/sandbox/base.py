"""The runtime interface: audio clips in, one [T, D] feature matrix per clip out.

Every way of running a participant's encoder (ONNX in a worker process, a Docker container)
implements `Runtime`. The probe, the extraction pipeline and the spot re-extraction all talk to
this interface only, so they behave the same whatever the submission kind.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class Limits:
    """Resource caps for one sandboxed encoder run (passed in, never read from globals)."""

    memory_mb: int = 4096  # RAM, swap included (memory == memory-swap)
    cpus: float = 2.0  # CPU cores (Docker --cpus)
    cpu_seconds: int = 3600  # CPU-time rlimit for the ONNX worker
    pids: int = 256  # processes/threads inside the sandbox
    wall_seconds: float = 600.0  # wall clock for one `encode` call (one chunk of clips)
    output_mb: int = 2048  # bytes the encoder may write to its output dir
    tmpfs_mb: int = 256  # scratch space (/tmp) inside a container
    log_bytes: int = 1 << 20  # stdout/stderr kept from the encoder
    gpu: bool = False  # ask for a GPU (fails with a clear message when none is usable)


class Runtime(Protocol):
    """A started encoder. Use as a context manager; `close` releases every process/container."""

    name: str  # "onnx" | "container"
    isolation: str  # human-readable description of the isolation actually in force
    device: str  # "cpu" | "cuda"
    calls: int  # how many clips the encoder has been asked to encode (for 'zero encoder calls')

    def encode(self, waves: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Encode clips of mono float32 16 kHz audio (1-D arrays, any lengths).

        Returns one float32 array [T_i, D] per clip, in order, with padding frames removed.
        Raises SandboxError (a SubmissionError) when the encoder fails, times out, hits a limit, or
        returns output that breaks the contract (wrong rank, mask length != T, missing items).
        """
        ...

    def close(self) -> None: ...

    def __enter__(self) -> Runtime: ...

    def __exit__(self, *exc) -> None: ...
