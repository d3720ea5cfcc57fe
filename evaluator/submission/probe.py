"""The probe: the behavioural checks every encoder must pass, run identically by build, validate and
the organizer (it talks only to a `Runtime`, so ONNX and container submissions get the same checks).

It encodes synthetic clips of six lengths from 0.1 s to 30 s (capped by ``max_audio_seconds``), one
at a time and as a zero-padded batch of three (twice), and five real-looking clips of one length
(speech-like, full-scale noise, silence, clipping, a full-scale sweep) alone and as a batch, then checks: the calls
succeed with the declared shape/dtype/mask; D == output_dim; values are finite; the frame count
follows the declared hop (or is the same for every clip when ``frames`` is "fixed"); two runs agree;
time and peak memory per audio-second (the memory check fails only past ``resources.memory_mb``).

Two things are measured rather than refused, because the organizer can make them correct:

* padding sensitivity: an encoder whose frames change when its clip is padded in a batch
  (normalisation over time, a reflect-padded STFT, an ignored mask) is encoded without padding,
  in batches of equal-length clips or alone (``report.batching``), at the throughput cost measured;
* output range: the store dtype is chosen to hold the largest value seen (``report.feature_dtype``).

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

from evaluator.errors import SandboxError, SandboxTimeout
from evaluator.sandbox.base import Deadline, Runtime, TimeBudget
from evaluator.submission.manifest import SAMPLE_RATE, Manifest

FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65504
RANGE_MARGIN = 8.0  # float16 only when the probe's peak is this far inside its range: real data is louder
BATCHINGS = ("padded", "equal_length", "alone")  # how extraction may batch this encoder's clips
EDGE_FRAMES = 3  # differences confined to this many last frames point at the padding mode


@dataclass(frozen=True)
class ProbeConfig:
    """What the probe feeds the encoder and how strict it is."""

    # audio
    min_seconds: float = 0.1
    max_seconds: float = 30.0  # further capped by the manifest's max_audio_seconds
    n_lengths: int = 6  # clip lengths, log-spaced between min and max
    batch_items: tuple[int, int, int] = (2, 4, 1)  # indices of the lengths packed into the padded batch
    range_seconds: float = 4.0  # length of the real-looking clips (capped by max_audio_seconds)
    seed: int = 0
    # tolerances
    hop_tolerance_frames: float = 2.0  # |T - seconds / hop| allowed ...
    hop_tolerance_ratio: float = 0.02  # ... or this fraction of the expected frames, whichever is larger
    padding_rtol: float = 1e-3  # padded-batch vs alone, relative to the clip's largest |feature|
    repeat_rtol: float = 1e-5  # run 1 vs run 2, relative to the largest |feature|
    # budgets (None: measured and reported only)
    max_seconds_per_audio_second: float | None = None
    time_budget: TimeBudget = TimeBudget()  # the whole probe's wall clock; the first timeout ends it

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
    # measured, not refused (see the module docstring)
    fixed_frames: int | None = None  # frames per clip when the manifest declares frames "fixed"
    batching: str = "padded"  # "padded" | "equal_length" | "alone": what extraction may do
    padding_max_rel_diff: float | None = None  # padded batch vs alone, relative to the clip's peak
    padding_cause: str | None = None  # likely cause when padding changes the frames
    unbatched_cost: float | None = None  # time alone / time in the padded batch, same clips
    feature_peak: float | None = None  # largest |feature| over every probe clip
    feature_dtype: str = "float16"  # the store dtype that holds feature_peak (with RANGE_MARGIN)
    time: dict = field(default_factory=dict)  # the probe's time budget and what it used

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

    @classmethod
    def from_dict(cls, d: dict) -> ProbeReport:
        """The report `to_dict` wrote (a passed probe is recorded and not rerun for the same submission)."""
        fields = {k: v for k, v in d.items() if k != "ok"}
        fields["checks"] = tuple(Check(**c) for c in d["checks"])
        fields["lengths_seconds"] = tuple(d["lengths_seconds"])
        fields["frames"] = tuple(d["frames"])
        return cls(**fields)

    def measured(self) -> dict:
        """The manifest's ``measured`` section (schema version 2)."""
        keys = ("fixed_frames", "feature_peak", "feature_dtype", "batching", "padding_max_rel_diff",
                "padding_cause", "unbatched_cost")
        out = {k: getattr(self, k) for k in keys}
        out["seconds_per_audio_second"] = self.seconds_per_audio_second
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in out.items()}


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


def range_audio(seconds: float, seed: int) -> list[tuple[str, np.ndarray]]:
    """Real-looking clips of one length for the output-range check: what a dataset holds at its
    extremes (speech, loud noise, digital silence, a clipped recording)."""
    from scipy.signal import chirp, lfilter  # 2 s to import: only when a probe runs, not on every rerun

    n = max(1, round(seconds * SAMPLE_RATE))
    rng = np.random.default_rng(seed)
    t = np.arange(n) / SAMPLE_RATE
    # speech-like: a glottal pulse train at a gliding pitch through two formant resonances, in syllables
    f0 = 120 + 30 * np.sin(2 * np.pi * 0.7 * t)
    pulses = (np.diff(np.floor(np.cumsum(f0) / SAMPLE_RATE), prepend=0) > 0).astype(np.float64)
    voiced = np.zeros(n)
    for formant, width in ((700, 80), (1200, 90)):  # two-pole resonators
        r = np.exp(-np.pi * width / SAMPLE_RATE)
        voiced += lfilter([1.0], [1.0, -2 * r * np.cos(2 * np.pi * formant / SAMPLE_RATE), r * r], pulses)
    syllables = np.clip(np.sin(2 * np.pi * 3.0 * t), 0, None) ** 0.5
    speech = voiced * syllables + 0.003 * rng.standard_normal(n)
    speech = 0.6 * speech / max(float(np.abs(speech).max()), 1e-9)
    noise = np.clip(rng.standard_normal(n) / 3.0, -1.0, 1.0)
    clipped = np.clip(8.0 * np.sin(2 * np.pi * 440 * t) + 0.5 * rng.standard_normal(n), -1.0, 1.0)
    # a full-scale sweep: a learned filterbank can resonate with one tone far beyond what noise excites
    sweep = 0.99 * chirp(t, f0=50.0, t1=max(float(t[-1]), 1e-3), f1=7500.0, method="logarithmic")
    clips = [("speech", speech), ("noise", noise), ("silence", np.zeros(n)), ("clipping", clipped),
             ("a full-scale sweep", sweep)]
    return [(name, w.astype(np.float32)) for name, w in clips]


def _encode(runtime: Runtime, waves: list[np.ndarray], failures: dict[str, list[str]], what: str,
            deadline: Deadline):
    deadline.grant(sum(len(w) for w in waves) / SAMPLE_RATE)
    try:
        out = runtime.encode(waves, timeout=deadline.remaining())
    except SandboxTimeout:
        raise  # the first call that times out ends the probe
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
        manifest: the submission's manifest (output_dim, frames, frame_hop_ms, limits).
        config: clip lengths, tolerances and budgets.

    Returns:
        A `ProbeReport`; ``report.reasons`` has one line per failing check (empty when all pass);
        ``batching``, ``fixed_frames`` and ``feature_dtype`` tell extraction how to run this encoder.
    """
    lengths = probe_lengths(manifest, config)
    waves = [probe_audio(s, config.seed + i) for i, s in enumerate(lengths)]
    range_seconds = min(config.range_seconds, manifest.max_audio_seconds)
    extremes = range_audio(range_seconds, config.seed + 100)
    failures: dict[str, list[str]] = {}
    batch_failures: dict[str, list[str]] = {}  # batched calls may fail: such an encoder is run alone

    deadline = Deadline(config.time_budget, "the probe")
    try:
        with _PeakMemory(runtime) as mem:
            started = time.perf_counter()
            alone, times = [], []
            for s, w in zip(lengths, waves):
                t0 = time.perf_counter()
                out = _encode(runtime, [w], failures, f"{s:g} s alone", deadline)
                times.append(time.perf_counter() - t0)
                alone.append(out[0] if out else None)
            elapsed = time.perf_counter() - started
            batch_waves = [waves[i] for i in config.batch_items]
            what = "padded batch of " + "/".join(f"{lengths[i]:g}" for i in config.batch_items) + " s"
            t0 = time.perf_counter()
            batch1 = _encode(runtime, batch_waves, batch_failures, what, deadline)
            batch_time = time.perf_counter() - t0
            batch2 = _encode(runtime, batch_waves, batch_failures, what + " (repeat)", deadline)
            real = [_encode(runtime, [w], failures, f"{range_seconds:g} s of {name}", deadline)
                    for name, w in extremes]
            real = [o[0] if o else None for o in real]
            equal = _encode(runtime, [w for _, w in extremes], batch_failures,
                            f"batch of {len(extremes)} equal-length clips", deadline)
            again = _encode(runtime, [extremes[0][1]], failures, f"{range_seconds:g} s of speech (repeat)",
                            deadline)
            peak = mem.peak_mb()
    except SandboxTimeout as e:
        return _timed_out(e, lengths, runtime, deadline)

    checks = [_check_runs(failures)]
    outputs = [o for o in alone + real + (batch1 or []) + (batch2 or []) + (equal or []) if o is not None]
    checks.append(_check_shape(outputs, manifest))
    checks.append(_check_finite(outputs, extremes, real))
    if manifest.fixed_frames:
        fixed_check, fixed = _check_fixed(lengths, alone, outputs)
        checks.append(fixed_check)
    else:
        checks.append(_check_hop(lengths, alone, manifest, config))
        fixed = None
    batch_error = next(iter(batch_failures), None)
    batching, pad_diff, cause = _padding(lengths, alone, batch1, real, equal, batch_error, config, manifest)
    checks.append(_check_padding(batching, pad_diff, cause, config))
    checks.append(_check_repeat([(batch1, batch2), (real[:1], again)], config))
    audio_seconds = sum(s for s, o in zip(lengths, alone) if o is not None)
    rate = elapsed / audio_seconds if audio_seconds else None
    checks.append(_check_speed(rate, config))
    per_second = peak / max(lengths) if peak is not None else None
    checks.append(_check_memory(peak, manifest))
    feature_peak = max((float(np.abs(o).max()) for o in outputs if o.size and np.isfinite(o).all()), default=None)
    items_alone = sum(times[i] for i in config.batch_items)
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
        fixed_frames=fixed,
        batching=batching,
        padding_max_rel_diff=pad_diff,
        padding_cause=cause,
        unbatched_cost=items_alone / batch_time if batch1 is not None and batch_time > 0 else None,
        feature_peak=feature_peak,
        feature_dtype=store_dtype(feature_peak),
        time=deadline.to_dict(),
    )


def _timed_out(e: SandboxTimeout, lengths, runtime, deadline: Deadline) -> ProbeReport:
    """The report of a probe ended by its first timeout: one line, nothing else measured."""
    return ProbeReport(
        checks=(Check("time", False, f"{e} (the probe stops at the first call that times out)"),),
        lengths_seconds=tuple(lengths), frames=tuple(None for _ in lengths), seconds_per_audio_second=None,
        peak_memory_mb=None, peak_memory_mb_per_audio_second=None,
        runtime={"name": getattr(runtime, "name", "?"), "device": getattr(runtime, "device", "?"),
                 "isolation": getattr(runtime, "isolation", "?")},
        time=deadline.to_dict(),
    )


def store_dtype(peak: float | None) -> str:
    """The smallest store dtype that holds features up to ``peak`` with room for louder real data."""
    return "float16" if peak is None or peak * RANGE_MARGIN <= FLOAT16_MAX else "float32"


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


def _check_finite(outputs: list[np.ndarray], extremes, real) -> Check:
    for (name, _), o in zip(extremes, real):
        if o is not None and o.size and not np.isfinite(o).all():
            bad = int(np.size(o) - np.isfinite(o).sum())
            return Check("finite", False, f"{bad} NaN or infinite value(s) on {name} "
                         "(guard divisions and logs: real datasets hold silence and clipped audio)")
    for o in outputs:
        if o.size and not np.isfinite(o).all():
            bad = int(np.size(o) - np.isfinite(o).sum())
            return Check("finite", False, f"{bad} NaN or infinite value(s) in an output of shape {o.shape}")
    return Check("finite", True, "all values finite, also on silence and clipped audio")


def _check_fixed(lengths, alone, outputs) -> tuple[Check, int | None]:
    counts = sorted({int(o.shape[0]) for o in outputs if o.ndim == 2})
    if len(counts) == 1 and counts[0] >= 1:
        return Check("frame_rate", True, f"every clip gives {counts[0]} frames (frames: fixed)"), counts[0]
    seen = ", ".join(f"{o.shape[0]} for {s:g} s" for s, o in zip(lengths, alone) if o is not None and o.ndim == 2)
    return Check("frame_rate", False, f"manifest declares frames \"fixed\" but clips give different frame counts "
                 f"({seen}): return the same number for every clip, or declare frames \"follows_audio\" "
                 "with frame_hop_ms"), None


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
        counts = {o.shape[0] for o in alone if o is not None and o.ndim >= 1}
        fix = (' — the count is the same for every clip: declare "frames": "fixed" (schema_version 2)'
               if len(counts) == 1 else " — fix frame_hop_ms, or return a frame mask that marks padding frames")
        return Check(
            "frame_rate",
            False,
            f"frame counts do not follow frame_hop_ms={manifest.frame_hop_ms:g}: " + "; ".join(bad) + fix,
        )
    return Check("frame_rate", True, f"frame counts follow {manifest.frames_per_second:g} frames/s")


def _frame_diff(ref: np.ndarray, new: np.ndarray, rtol: float) -> tuple[float, np.ndarray]:
    """(largest |ref - new| relative to ref's peak, indices of the frames beyond ``rtol``)."""
    if not ref.size:
        return 0.0, np.zeros(0, int)
    with np.errstate(invalid="ignore"):  # NaNs are the 'finite' check's business
        scale = max(float(np.nanmax(np.abs(ref))) if np.isfinite(ref).any() else 0.0, 1e-6)
        per_frame = np.nan_to_num(np.abs(ref.astype(np.float64) - new)).max(axis=1) / scale
    return (float(per_frame.max()) if per_frame.size else 0.0), np.flatnonzero(per_frame > rtol)


def _cause(bad_frames: np.ndarray, frames: int, manifest: Manifest) -> str:
    no_mask = manifest.onnx is not None and not manifest.onnx.mask_input
    if len(bad_frames) and bad_frames.min() >= frames - EDGE_FRAMES:
        why = (f"only the last {frames - int(bad_frames.min())} frame(s) change: the padding at the clip's end "
               "(a reflect- or replicate-padded STFT, a convolution reaching past the end)")
    else:
        why = ("frames across the clip change: normalisation over time (GroupNorm or instance norm over the "
               "padded length, as in wav2vec2, WavLM and HuBERT) or a sample mask the encoder ignores")
    return why + (" (the model takes no sample mask)" if no_mask else "")


def _padding(lengths, alone, batch, real, equal, batch_error: str | None, config: ProbeConfig, manifest: Manifest):
    """How extraction may batch: (batching, largest change padding makes, likely cause)."""
    diffs, causes, padded_ok = [], [], batch is not None
    for o, i in zip(batch or [], config.batch_items):
        ref = alone[i]
        if ref is None or o.ndim != 2 or ref.ndim != 2:
            continue
        if o.shape != ref.shape:
            padded_ok = False
            causes.append(f"the {lengths[i]:g} s clip gives {ref.shape[0]} frames alone and {o.shape[0]} when "
                          "padded: frames of the padding are returned (return a frame mask to batch faster)")
            continue
        diff, bad = _frame_diff(ref, o, config.padding_rtol)
        diffs.append(diff)
        if len(bad):
            padded_ok = False
            causes.append(_cause(bad, ref.shape[0], manifest))
    worst = max(diffs) if diffs else None
    if padded_ok:
        return "padded", worst, None
    cause = causes[0] if causes else f"batched calls fail ({batch_error})"
    equal_ok = equal is not None and all(
        r is not None and e.shape == r.shape and _frame_diff(r, e, config.padding_rtol)[0] <= config.padding_rtol
        for r, e in zip(real, equal)
    )
    if equal_ok:
        return "equal_length", worst, cause
    if equal is None:
        return "alone", worst, cause + "; batches of equal-length clips fail too"
    return "alone", worst, cause + "; clips of equal length also change when batched together (state shared across the batch)"


def _check_padding(batching: str, diff: float | None, cause: str | None, config: ProbeConfig) -> Check:
    if batching == "padded":
        return Check("padding", True, f"padding leaves each clip's frames unchanged (rtol {config.padding_rtol:g})")
    how = "in batches of equal-length clips" if batching == "equal_length" else "one clip at a time"
    size = f"change by {diff:.2g} (relative) " if diff is not None else ""
    return Check("padding", True, f"frames {size}when the clip is padded: {cause}. Extraction encodes clips {how}, "
                 "so padding never reaches them")


def _check_repeat(pairs, config: ProbeConfig) -> Check:
    compared = 0
    for first, second in pairs:
        if first is None or second is None:
            continue
        for a, b in zip(first, second):
            if a is None or b is None:
                continue
            compared += 1
            if a.shape != b.shape:
                return Check("deterministic", False,
                             f"two runs on the same audio gave shapes {a.shape} and {b.shape}")
            diff = _max_rel_diff(a, b)
            if diff > config.repeat_rtol:
                return Check(
                    "deterministic",
                    False,
                    f"two runs on the same audio differ by {diff:.2g} (relative): remove randomness "
                    "(dropout in train mode, random ops) from the encoder",
                )
    if not compared:
        return Check("deterministic", False, "the repeated calls failed (see 'runs')")
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
