"""The probe: the behavioural checks every encoder must pass, run identically by build, validate and
the organizer (it talks only to a `Runtime`, so ONNX and container submissions get the same checks).

It encodes synthetic clips of six lengths from 0.1 s to 30 s (capped by ``max_audio_seconds``), one
at a time and as a zero-padded batch of three (twice), then checks: the calls succeed with the
declared shape/dtype/mask; D == output_dim; values are finite; the frame count follows the declared
hop; padding does not change an item's own frames; two runs agree; time and peak memory per
audio-second (the memory check fails only past the manifest's ``resources.memory_mb``).

Example::

    with open_runtime(root, manifest, Limits()) as rt:
        report = run_probe(rt, manifest)
    print(report.reasons)
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from evaluator.errors import SandboxError
from evaluator.sandbox.base import Runtime
from evaluator.submission.manifest import SAMPLE_RATE, Manifest


@dataclass(frozen=True)
class ProbeConfig:
    """What the probe feeds the encoder and how strict it is."""

    # audio
    min_seconds: float = 0.1
    max_seconds: float = 30.0  # further capped by the manifest's max_audio_seconds
    n_lengths: int = 6  # clip lengths, log-spaced between min and max
    batch_items: tuple[int, int, int] = (2, 4, 1)  # indices of the lengths packed into the padded batch
    seed: int = 0
    # tolerances
    hop_tolerance_frames: float = 2.0  # |T - seconds / hop| allowed ...
    hop_tolerance_ratio: float = 0.02  # ... or this fraction of the expected frames, whichever is larger
    padding_rtol: float = 1e-3  # padded-batch vs alone, relative to the clip's largest |feature|
    repeat_rtol: float = 1e-5  # run 1 vs run 2, relative to the largest |feature|
    # budgets (None: measured and reported only)
    max_seconds_per_audio_second: float | None = None

    def __post_init__(self):
        if self.n_lengths < 5:
            raise ValueError("the probe needs at least five clip lengths")
        if not all(0 <= i < self.n_lengths for i in self.batch_items):
            raise ValueError("batch_items must index the probe lengths")


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


@dataclass(frozen=True)
class ProbeReport:
    checks: tuple[Check, ...]
    lengths_seconds: tuple[float, ...]
    frames: tuple[int | None, ...]  # frames returned per probe length (None: the call failed)
    seconds_per_audio_second: float | None
    peak_memory_mb: float | None  # peak resident memory above the level before the probe
    peak_memory_mb_per_audio_second: float | None
    runtime: dict = field(default_factory=dict)  # name, device, isolation

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def reasons(self) -> list[str]:
        return [f"{c.name}: {c.detail}" for c in self.checks if not c.ok]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ok"] = self.ok
        return d


def probe_lengths(manifest: Manifest, config: ProbeConfig) -> list[float]:
    """Clip lengths in seconds (log-spaced, rounded to 10 ms, capped by the manifest)."""
    top = min(config.max_seconds, manifest.max_audio_seconds)
    bottom = min(config.min_seconds, top / 10)
    return [round(float(s), 2) or 0.01 for s in np.geomspace(bottom, top, config.n_lengths)]


def probe_audio(seconds: float, seed: int) -> np.ndarray:
    """A reproducible test clip: tones, noise and a silent stretch, peak about 0.5."""
    n = max(1, round(seconds * SAMPLE_RATE))
    rng = np.random.default_rng(seed)
    t = np.arange(n) / SAMPLE_RATE
    wave = 0.25 * np.sin(2 * np.pi * (220 + 180 * np.sin(2 * np.pi * 0.5 * t)) * t)
    wave += 0.1 * rng.standard_normal(n)
    wave[n // 3 : n // 3 + n // 10] = 0.0  # silence: encoders must cope with exact zeros
    return wave.astype(np.float32)


class _PeakMemory:
    """Peak resident memory of this process during a block (Linux: VmHWM, reset via clear_refs)."""

    def __init__(self, runtime: Runtime):
        self.runtime = runtime

    def __enter__(self):
        own = getattr(self.runtime, "peak_memory_mb", None)
        self._own = own if callable(own) else None
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        except OSError:
            pass
        self.start = _status_mb("VmRSS")
        return self

    def __exit__(self, *exc):
        pass

    def peak_mb(self) -> float | None:
        if self._own is not None:  # a runtime in another process reports its own peak
            return self._own()
        if getattr(self.runtime, "name", "") != "onnx":  # this process' memory says nothing about a container
            return None
        peak = _status_mb("VmHWM")
        if peak is None or self.start is None:
            return None
        return max(0.0, peak - self.start)


def _status_mb(key: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        return None
    return None


def _encode(runtime: Runtime, waves: list[np.ndarray], failures: dict[str, list[str]], what: str):
    try:
        out = runtime.encode(waves)
    except SandboxError as e:
        failures.setdefault(str(e), []).append(what)
        return None
    if not isinstance(out, list) or len(out) != len(waves):
        failures.setdefault(
            f"returned {len(out) if isinstance(out, list) else type(out).__name__} results "
            f"for {len(waves)} clip(s)",
            [],
        ).append(what)
        return None
    return [np.asarray(o) for o in out]


def _max_rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Largest |a - b| relative to the largest |a| (NaNs are the 'finite' check's business)."""
    if not a.size:
        return 0.0
    with np.errstate(invalid="ignore"):
        scale = max(float(np.nanmax(np.abs(a))) if np.isfinite(a).any() else 0.0, 1e-6)
        diff = np.abs(a.astype(np.float64) - b)
        return float(np.nanmax(diff)) / scale if not np.isnan(diff).all() else 0.0


def run_probe(runtime: Runtime, manifest: Manifest, config: ProbeConfig = ProbeConfig()) -> ProbeReport:
    """Run every behavioural check on a started runtime.

    Args:
        runtime: the encoder, from `evaluator.sandbox.open_runtime`.
        manifest: the submission's manifest (output_dim, frame_hop_ms, limits).
        config: clip lengths, tolerances and budgets.

    Returns:
        A `ProbeReport`; ``report.reasons`` has one line per failing check (empty when all pass).
    """
    lengths = probe_lengths(manifest, config)
    waves = [probe_audio(s, config.seed + i) for i, s in enumerate(lengths)]
    failures: dict[str, list[str]] = {}

    with _PeakMemory(runtime) as mem:
        started = time.perf_counter()
        alone = [_encode(runtime, [w], failures, f"{s:g} s alone") for s, w in zip(lengths, waves)]
        alone = [o[0] if o else None for o in alone]
        elapsed = time.perf_counter() - started
        batch_waves = [waves[i] for i in config.batch_items]
        what = "padded batch of " + "/".join(f"{lengths[i]:g}" for i in config.batch_items) + " s"
        batch1 = _encode(runtime, batch_waves, failures, what)
        batch2 = _encode(runtime, batch_waves, failures, what + " (repeat)")
        peak = mem.peak_mb()

    checks = [_check_runs(failures)]
    outputs = [o for o in alone + (batch1 or []) + (batch2 or []) if o is not None]
    checks.append(_check_shape(outputs, manifest))
    checks.append(_check_finite(outputs))
    checks.append(_check_hop(lengths, alone, manifest, config))
    checks.append(_check_padding(lengths, alone, batch1, config))
    checks.append(_check_repeat(batch1, batch2, config))
    audio_seconds = sum(s for s, o in zip(lengths, alone) if o is not None)
    rate = elapsed / audio_seconds if audio_seconds else None
    checks.append(_check_speed(rate, config))
    per_second = peak / max(lengths) if peak is not None else None
    checks.append(_check_memory(peak, manifest))
    return ProbeReport(
        checks=tuple(checks),
        lengths_seconds=tuple(lengths),
        frames=tuple(None if o is None else int(o.shape[0]) for o in alone),
        seconds_per_audio_second=rate,
        peak_memory_mb=peak,
        peak_memory_mb_per_audio_second=per_second,
        runtime={
            "name": getattr(runtime, "name", "?"),
            "device": getattr(runtime, "device", "?"),
            "isolation": getattr(runtime, "isolation", "?"),
        },
    )


def _check_runs(failures: dict[str, list[str]]) -> Check:
    if not failures:
        return Check("runs", True, "every call returned one output per clip")
    calls = sum(len(w) for w in failures.values())
    (msg, whats), *others = failures.items()
    detail = f"{calls} call(s) failed; {msg} (on {', '.join(whats[:3])}{', ...' if len(whats) > 3 else ''})"
    if others:
        detail += f"; and {len(others)} other error(s), e.g. {others[0][0]}"
    return Check("runs", False, detail)


def _check_shape(outputs: list[np.ndarray], manifest: Manifest) -> Check:
    if not outputs:
        return Check("shape", False, "no output to check (every call failed)")
    for o in outputs:
        if o.ndim != 2:
            return Check("shape", False, f"an output has shape {o.shape}; expected [T, D] per clip")
        if o.shape[1] != manifest.output_dim:
            return Check("shape", False, f"D = {o.shape[1]} but manifest output_dim = {manifest.output_dim}")
        if o.dtype != np.float32:
            return Check("shape", False, f"the runtime returned {o.dtype}; expected float32")
    return Check("shape", True, f"[T, {manifest.output_dim}] float32 for every clip")


def _check_finite(outputs: list[np.ndarray]) -> Check:
    for o in outputs:
        if o.size and not np.isfinite(o).all():
            bad = int(np.size(o) - np.isfinite(o).sum())
            return Check("finite", False, f"{bad} NaN or infinite value(s) in an output of shape {o.shape}")
    return Check("finite", True, "all values finite")


def _check_hop(lengths, alone, manifest: Manifest, config: ProbeConfig) -> Check:
    bad = []
    for s, o in zip(lengths, alone):
        if o is None or o.ndim < 1:
            continue
        expected = s * 1000.0 / manifest.frame_hop_ms
        tol = max(config.hop_tolerance_frames, config.hop_tolerance_ratio * expected)
        if abs(o.shape[0] - expected) > tol:
            bad.append(f"{o.shape[0]} frames for {s:g} s (expected about {expected:.0f})")
    if bad:
        return Check(
            "frame_rate",
            False,
            f"frame counts do not follow frame_hop_ms={manifest.frame_hop_ms:g}: "
            + "; ".join(bad)
            + " — fix frame_hop_ms, or return a frame mask that marks padding frames",
        )
    return Check("frame_rate", True, f"frame counts follow {manifest.frames_per_second:g} frames/s")


def _check_padding(lengths, alone, batch, config: ProbeConfig) -> Check:
    if batch is None:
        return Check("padding", False, "the padded batch failed (see 'runs')")
    bad = []
    for o, i in zip(batch, config.batch_items):
        ref = alone[i]
        if ref is None or o.ndim != 2 or ref.ndim != 2:
            continue
        if o.shape != ref.shape:
            bad.append(
                f"{lengths[i]:g} s clip: {ref.shape[0]} frames alone, {o.shape[0]} in the padded batch"
            )
            continue
        diff = _max_rel_diff(ref, o)
        if diff > config.padding_rtol:
            bad.append(f"{lengths[i]:g} s clip: frames differ by {diff:.2g} (relative) when padded")
    if bad:
        return Check(
            "padding",
            False,
            "; ".join(bad) + " — the encoder must ignore padded samples (use audio_attention_mask)",
        )
    return Check(
        "padding", True, f"padding leaves each clip's frames unchanged (rtol {config.padding_rtol:g})"
    )


def _check_repeat(batch1, batch2, config: ProbeConfig) -> Check:
    if batch1 is None or batch2 is None:
        return Check("deterministic", False, "the repeated batch failed (see 'runs')")
    for a, b in zip(batch1, batch2):
        if a.shape != b.shape:
            return Check(
                "deterministic", False, f"two runs on the same batch gave shapes {a.shape} and {b.shape}"
            )
        diff = _max_rel_diff(a, b)
        if diff > config.repeat_rtol:
            return Check(
                "deterministic",
                False,
                f"two runs on the same audio differ by {diff:.2g} (relative): remove randomness "
                "(dropout in train mode, random ops) from the encoder",
            )
    return Check("deterministic", True, "two runs give the same output")


def _check_speed(rate: float | None, config: ProbeConfig) -> Check:
    if rate is None:
        return Check("speed", config.max_seconds_per_audio_second is None, "not measured (every call failed)")
    detail = f"{rate:.4f} s per audio-second"
    if config.max_seconds_per_audio_second is not None and rate > config.max_seconds_per_audio_second:
        return Check("speed", False, detail + f", over the {config.max_seconds_per_audio_second:g} budget")
    return Check("speed", True, detail)


def _check_memory(peak: float | None, manifest: Manifest) -> Check:
    budget = manifest.resources.memory_mb
    if peak is None:
        return Check("memory", True, "peak memory not measured for this runtime")
    detail = f"peak {peak:.0f} MiB used by the encoder"
    if peak > budget:
        return Check("memory", False, detail + f", over the manifest's resources.memory_mb = {budget}")
    return Check("memory", True, detail + f" (budget {budget} MiB)")
