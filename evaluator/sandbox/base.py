"""The runtime interface: audio clips in, one [T, D] feature matrix per clip out.

Every way of running a participant's encoder (ONNX in a worker process, a Docker container)
implements `Runtime`. The probe, the extraction pipeline and the spot re-extraction all talk to
this interface only, so they behave the same whatever the submission kind.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from evaluator.errors import SandboxTimeout


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


@dataclass(frozen=True)
class TimeBudget:
    """Wall clock one probe or one extraction may take: a floor plus so many seconds per audio-second
    handed to the encoder. Per-call limits alone let a hung encoder hold the organizer for
    calls x wall_seconds."""

    seconds_per_audio_second: float = 10.0  # 10: the encoder must run at least 0.1x real time on average
    floor_seconds: float = 300.0

    def __post_init__(self):
        if not (self.seconds_per_audio_second > 0 and self.floor_seconds > 0):
            raise ValueError("a time budget needs positive seconds")

    def describe(self) -> str:
        return f"{self.floor_seconds:g} s + {self.seconds_per_audio_second:g} s per audio-second"


class Deadline:
    """A running `TimeBudget`: the limit grows with the audio granted to the encoder so far."""

    def __init__(self, budget: TimeBudget, what: str):
        self.budget, self.what = budget, what
        self.start = time.monotonic()
        self.audio_seconds = 0.0

    def grant(self, audio_seconds: float) -> None:
        self.audio_seconds += audio_seconds

    @property
    def limit(self) -> float:
        return self.budget.floor_seconds + self.budget.seconds_per_audio_second * self.audio_seconds

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def remaining(self) -> float:
        """Seconds left; raises SandboxTimeout when none are."""
        left = self.limit - self.elapsed
        if left <= 0:
            raise SandboxTimeout(
                f"{self.what} ran past its time budget: {self.elapsed:.0f} s for {self.audio_seconds:.1f} "
                f"audio-seconds (limit {self.budget.describe()}; --time-limit sets the rate)"
            )
        return left

    def to_dict(self) -> dict:
        return {"budget": self.budget.describe(), "limit_s": round(self.limit, 1),
                "elapsed_s": round(self.elapsed, 1), "audio_seconds": round(self.audio_seconds, 2)}


class Runtime(Protocol):
    """A started encoder. Use as a context manager; `close` releases every process/container."""

    name: str  # "onnx" | "container"
    isolation: str  # human-readable description of the isolation actually in force
    device: str  # "cpu" | "cuda"
    calls: int  # how many clips the encoder has been asked to encode (for 'zero encoder calls')

    def encode(self, waves: Sequence[np.ndarray], *, timeout: float | None = None) -> list[np.ndarray]:
        """Encode clips of mono float32 16 kHz audio (1-D arrays, any lengths).

        ``timeout`` caps this call's wall clock below ``Limits.wall_seconds`` (what is left of a budget).
        Returns one float32 array [T_i, D] per clip, in order, with padding frames removed.
        Raises SandboxError (a SubmissionError) when the encoder fails, hits a limit, or returns output
        that breaks the contract (wrong rank, mask length != T, missing items); SandboxTimeout when it
        runs past the wall clock (the encoder is killed, never waited for).
        """
        ...

    def close(self) -> None: ...

    def __enter__(self) -> Runtime: ...

    def __exit__(self, *exc) -> None: ...
