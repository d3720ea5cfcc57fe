"""Host side of feature extraction: clips in, validated features into the store, once per clip.

The data stage hands over `Clip`s (mono float32 16 kHz audio, targets); this module batches them by
length, runs the sandboxed `Runtime` one chunk at a time, checks every returned array against the
manifest, and writes finished clips to a `FeatureStore` shard by shard. A store that is already
complete is reused without touching the encoder; an interrupted one resumes where it stopped.

Long clips: a clip longer than the encoder's ``max_audio_seconds`` (the store key's
``window_seconds``) is cut into the fewest equal windows that fit, each window is encoded as its own
item, and the windows' features are concatenated along time. Windows do not overlap, so the encoder
sees no context across a boundary, and the frame count stays about duration / hop.

Failures, decided per kind:
  * output that breaks the contract (not [T, D], wrong D, T far from duration / hop, NaN or inf,
    a non-float dtype) fails the submission at once: `SandboxError` naming the clip;
  * an encoder error (crash, timeout, limit) on a chunk is retried clip by clip; a clip that still
    fails is recorded in the store as a `Failure` (scored as wrong later, never dropped). More than
    ``max_failed_fraction`` of the clips, or ``max_consecutive_failures`` in a row, fails the
    submission.

Example::

    with open_runtime(root, manifest, limits) as rt:
        report = extract(rt, iter_clips(task, "train"), store, manifest)
    print(report.summary())
"""

from __future__ import annotations

import math
import resource
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from evaluator.errors import ConfigError, DataError, SandboxError, SandboxTimeout, first_line
from evaluator.features import Failure, FeatureStore, PendingClip, numpy_dtype
from evaluator.sandbox.base import Deadline, TimeBudget
from evaluator.submission.manifest import SAMPLE_RATE

if TYPE_CHECKING:  # types only: extraction needs no sandbox or submission code at run time
    from evaluator.sandbox.base import Runtime
    from evaluator.submission.manifest import Manifest

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))
BATCHINGS = ("padded", "equal_length", "alone")  # see ExtractionConfig.batching
MAX_REASONS = 5  # failure reasons repeated in an error message


class ClipLike(Protocol):
    """What extraction needs from the data stage's `Clip`."""

    key: str
    audio: np.ndarray  # float32 [S] at 16 kHz, mono
    targets: tuple[str, ...]
    prompt: str | None  # the clip's own prompt, stored with its features


@dataclass(frozen=True)
class ExtractionConfig:
    """How the work is cut and checked. Only ``batching`` can change features (of an encoder the
    probe found padding-sensitive), so callers put a non-default value into the store key."""

    # batching
    batch_clips: int = 16  # most items (clips or windows) per encoder call
    batch_seconds: float = 480.0  # most padded audio per call: longest item (s) x items
    batching: str = "padded"  # "padded" | "equal_length" | "alone": the probe's verdict on padding
    sort_buffer: int = 512  # clips read ahead and sorted by length before batching ...
    buffer_seconds: float = 3600.0  # ... but no more audio than this (s): ~230 MB of float32 at 16 kHz
    shard_bytes: int = 256 << 20  # features (in the store dtype) per shard file
    # output checks
    frame_tolerance: float = 0.1  # allowed |T - duration/hop| as a fraction of duration/hop ...
    frame_slack: int = 2  # ... plus this many frames (convolution edges, centring)
    fixed_frames: int | None = None  # frames "fixed": the count the probe measured (None: not checked)
    # failure policy
    max_failed_fraction: float = 0.01  # clips the encoder may fail on before the submission fails
    max_consecutive_failures: int = 8  # a run of failed clips this long fails it at once
    time_budget: TimeBudget = TimeBudget()  # wall clock of one extract call, growing with the audio encoded

    def __post_init__(self):
        if self.batch_clips < 1 or self.sort_buffer < 1 or self.shard_bytes < 1:
            raise ConfigError("batch_clips, sort_buffer and shard_bytes must be positive")
        if not (self.batch_seconds > 0 and self.buffer_seconds > 0):
            raise ConfigError("batch_seconds and buffer_seconds must be positive")
        if not 0 <= self.max_failed_fraction <= 1:
            raise ConfigError(f"max_failed_fraction must be in [0, 1], got {self.max_failed_fraction}")
        if self.max_consecutive_failures < 1:
            raise ConfigError("max_consecutive_failures must be at least 1")
        if self.batching not in BATCHINGS:
            raise ConfigError(f"batching must be one of {', '.join(BATCHINGS)}, got {self.batching!r}")


@dataclass(frozen=True)
class ExtractionReport:
    """What one `extract` call did; `encoder_calls` is 0 when a complete store was reused."""

    store: str  # store directory
    clips: int  # clips in the store
    failed: int  # clips the encoder could not encode
    encoded: int  # clips encoded by this call
    resumed: int  # clips found done from an earlier, interrupted call
    reused: bool  # the store was already complete
    audio_seconds: float  # audio encoded by this call
    wall_seconds: float
    encoder_calls: int  # runtime.calls during this call (clips and windows sent to the encoder)
    windowed: int  # clips longer than the window, encoded in pieces
    bytes_stored: int  # bytes of feature shards in the store

    @property
    def audio_seconds_per_second(self) -> float:
        return self.audio_seconds / self.wall_seconds if self.wall_seconds > 0 else 0.0

    def summary(self) -> str:
        if self.reused:
            return (f"reused {self.store}: {self.clips} clips, {self.failed} failed, "
                    f"{_mb(self.bytes_stored)} stored, 0 encoder calls")
        return (
            f"{self.clips} clips ({self.encoded} encoded now, {self.resumed} resumed, {self.failed} failed), "
            f"{self.audio_seconds:.1f} audio-s in {self.wall_seconds:.1f} s = "
            f"{self.audio_seconds_per_second:.1f} audio-s/s, {_mb(self.bytes_stored)} stored, "
            f"{self.encoder_calls} encoder calls"
        )

    def to_dict(self) -> dict:
        return {**asdict(self), "audio_seconds_per_second": self.audio_seconds_per_second}


@dataclass(frozen=True)
class SpotCheckReport:
    checked: tuple[str, ...]  # clip keys re-extracted
    max_abs_diff: float  # largest |new - stored| over every checked clip
    worst_key: str | None  # the clip with the largest excess over the tolerance
    encoder_calls: int
    seconds: float


# ---- validation ------------------------------------------------------------------------------
def expected_frames(num_samples: int, manifest: Manifest) -> float:
    return num_samples / SAMPLE_RATE * manifest.frames_per_second


def output_problems(
    arr: object, num_samples: int, manifest: Manifest, config: ExtractionConfig
) -> list[str]:
    """Every way ``arr`` breaks the contract for a clip of ``num_samples`` (empty when valid)."""
    if not isinstance(arr, np.ndarray):
        return [f"expected a numpy array, got {type(arr).__name__}"]
    if arr.ndim != 2:
        return [f"expected shape [T, {manifest.output_dim}], got {list(arr.shape)}"]
    problems = []
    if arr.dtype not in FLOAT_DTYPES:
        problems.append(f"expected float32 or float16 features, got {arr.dtype}")
    t, d = arr.shape
    if d != manifest.output_dim:
        problems.append(f"expected D = output_dim = {manifest.output_dim}, got D = {d}")
    if manifest.fixed_frames:
        if t < 1 or (config.fixed_frames is not None and t != config.fixed_frames):
            problems.append(f"T = {t} frames for {num_samples / SAMPLE_RATE:.3f} s of audio; the encoder declares "
                            f"a fixed count and gave {config.fixed_frames} to the probe")
    else:
        want = expected_frames(num_samples, manifest)
        allowed = config.frame_slack + config.frame_tolerance * want
        if t < 1:
            problems.append(f"no frames for {num_samples / SAMPLE_RATE:.3f} s of audio (expected ~{want:.1f})")
        elif abs(t - want) > allowed:
            problems.append(
                f"T = {t} frames for {num_samples / SAMPLE_RATE:.3f} s of audio, expected {want:.1f} +- {allowed:.1f} "
                f"(frame_hop_ms = {manifest.frame_hop_ms:g})"
            )
    if arr.dtype in FLOAT_DTYPES and arr.size and not np.isfinite(arr).all():
        bad = int(arr.size - np.isfinite(arr).sum())
        problems.append(f"{bad} of {arr.size} values are NaN or infinite")
    return problems


# ---- windows and batches ---------------------------------------------------------------------
def window_bounds(num_samples: int, window_seconds: float | None) -> list[tuple[int, int]]:
    """Split [0, num_samples) into the fewest equal windows of at most ``window_seconds``."""
    if window_seconds is None:
        return [(0, num_samples)]
    limit = max(1, int(window_seconds * SAMPLE_RATE))
    n = max(1, math.ceil(num_samples / limit))
    edges = [round(i * num_samples / n) for i in range(n + 1)]
    return [(edges[i], edges[i + 1]) for i in range(n)]


@dataclass
class _Piece:
    clip: int  # index in the buffer
    wave: np.ndarray


def _batches(pieces: Sequence[_Piece], config: ExtractionConfig) -> Iterator[list[_Piece]]:
    """Pieces sorted by length, cut into calls under both the item and the padded-seconds caps; for a
    padding-sensitive encoder only pieces of one length share a call (or none do)."""
    batch: list[_Piece] = []
    for p in sorted(pieces, key=lambda p: len(p.wave)):
        longest = max([len(p.wave)] + [len(q.wave) for q in batch])
        apart = bool(batch) and (config.batching == "alone" or (
            config.batching == "equal_length" and len(p.wave) != len(batch[0].wave)))
        if batch and (apart or len(batch) + 1 > config.batch_clips
                      or longest * (len(batch) + 1) / SAMPLE_RATE > config.batch_seconds):
            yield batch
            batch = []
        batch.append(p)
    if batch:
        yield batch


def _prepare_audio(clip: ClipLike, crop_seconds: float | None) -> np.ndarray:
    audio = clip.audio
    if not isinstance(audio, np.ndarray) or audio.ndim != 1 or audio.dtype != np.float32:
        shape = getattr(audio, "shape", None)
        raise DataError(f"clip {clip.key}: expected mono float32 audio [S], got {getattr(audio, 'dtype', type(audio))} "
                        f"{list(shape) if shape is not None else ''}")
    if audio.size == 0:
        raise DataError(f"clip {clip.key}: the audio is empty")
    if crop_seconds is not None:
        audio = audio[: max(1, int(crop_seconds * SAMPLE_RATE))]
    return audio


class _Encoder:
    """Runs pieces through the runtime, isolating failing clips and validating every output, all within
    one time budget (a hung encoder is stopped when the budget runs out, not after calls x wall_seconds)."""

    def __init__(self, runtime: Runtime, manifest: Manifest, config: ExtractionConfig, what: str = "extraction"):
        self.runtime, self.manifest, self.config = runtime, manifest, config
        self.deadline = Deadline(config.time_budget, what)

    def encode(self, keys: Sequence[str], waves: Sequence[np.ndarray], window_seconds: float | None
               ) -> list[np.ndarray | str]:
        """One [T, D] float32 array per clip, or the encoder's error message for a failed clip.

        Raises:
            SandboxError: an output breaks the contract.
        """
        pieces = [
            _Piece(i, w[a:b]) for i, w in enumerate(waves) for a, b in window_bounds(len(w), window_seconds)
        ]
        outputs: dict[int, list[tuple[int, np.ndarray]]] = {}
        errors: dict[int, str] = {}
        order = {id(p): n for n, p in enumerate(pieces)}  # piece order within its clip
        for batch in _batches(pieces, self.config):
            for piece, out in zip(batch, self._run(batch)):
                if isinstance(out, str):
                    errors.setdefault(piece.clip, out)
                    continue
                problems = output_problems(out, len(piece.wave), self.manifest, self.config)
                if problems:
                    raise SandboxError(f"the encoder's output for clip {keys[piece.clip]} breaks the contract",
                                       reasons=problems)
                outputs.setdefault(piece.clip, []).append((order[id(piece)], out))
        results: list[np.ndarray | str] = []
        for i in range(len(waves)):
            if i in errors:
                results.append(errors[i])
            else:
                parts = [a for _, a in sorted(outputs[i], key=lambda t: t[0])]
                results.append(np.concatenate(parts, axis=0).astype(np.float32, copy=False))
        return results

    def _run(self, batch: list[_Piece], granted: bool = False) -> list[np.ndarray | str]:
        waves = [p.wave for p in batch]
        if not granted:
            self.deadline.grant(sum(len(w) for w in waves) / SAMPLE_RATE)
        try:
            out = self.runtime.encode(waves, timeout=self.deadline.remaining())
        except SandboxTimeout:
            if self.deadline.limit - self.deadline.elapsed <= 0:
                self.deadline.remaining()  # raises, naming the budget: no time left, the submission fails now
            if len(batch) == 1:
                raise  # a clip that hangs alone
            return [self._run([p], granted=True)[0] for p in batch]  # one clip may be the one that hangs
        except SandboxError as e:
            if len(batch) == 1:
                return [first_line(e)]
            return [self._run([p], granted=True)[0] for p in batch]  # isolate the clip(s) that fail
        if not isinstance(out, (list, tuple)) or len(out) != len(waves):
            got = len(out) if isinstance(out, (list, tuple)) else type(out).__name__
            raise SandboxError(f"the encoder returned {got} outputs for {len(waves)} clips")
        return list(out)


# ---- extraction ------------------------------------------------------------------------------
def extract(
    runtime: Runtime,
    clips: Iterable[ClipLike],
    store: FeatureStore,
    manifest: Manifest,
    config: ExtractionConfig = ExtractionConfig(),
    *,
    progress: Callable[[int, float], None] | None = None,
) -> ExtractionReport:
    """Encode every clip not yet in ``store`` and finish the store.

    Args:
        runtime: a started encoder sandbox.
        clips: the task split's clips in data order; keys must be unique.
        store: opened for this submission and data (`FeatureStore.open`); its key sets dtype,
            window and crop.
        manifest: the submission's manifest (output_dim, frame_hop_ms for the checks).
        config: batching and failure policy.
        progress: called with (clips done, audio-seconds done) after each chunk and skipped clip.

    Returns:
        The report; ``encoder_calls == 0`` and ``reused`` when the store was already complete
        (the clips are then not even read).

    Raises:
        SandboxError: contract-breaking output, or too many clips the encoder failed on.
        DataError: a duplicate clip key or unusable audio.
    """
    start, calls0 = time.monotonic(), runtime.calls
    if store.complete:
        return reused_report(store)
    done = store.done_keys()
    run = _Run(runtime, store, manifest, config, progress)
    seen: set[str] = set()
    buffer: list[tuple[int, ClipLike]] = []
    buffered = 0.0  # audio-seconds in the buffer
    try:
        for ordinal, clip in enumerate(clips):
            if clip.key in seen:
                raise DataError(f"clip key {clip.key!r} appears twice in the data; keys must be unique per split")
            seen.add(clip.key)
            if clip.key in done:
                run.skip(clip)
                continue
            buffer.append((ordinal, clip))
            buffered += len(clip.audio) / SAMPLE_RATE
            if len(buffer) >= config.sort_buffer or buffered >= config.buffer_seconds:
                run.encode_buffer(buffer)
                buffer, buffered = [], 0.0
        if buffer:
            run.encode_buffer(buffer)
            buffer = []
    finally:
        run.flush()  # keep every validated clip, also when interrupted
    missing = done - seen
    if missing:
        raise DataError(
            f"the feature store {store.path} holds {len(missing)} clips the data no longer has "
            f"(e.g. {min(missing)!r}); the data changed under the same digests"
        )
    total = len(store.entries) + len(store.failures)
    if total and len(store.failures) > config.max_failed_fraction * total:
        raise SandboxError(
            f"the encoder failed on {len(store.failures)} of {total} clips "
            f"(more than {config.max_failed_fraction:.1%})",
            reasons=[f"{f.key}: {f.reason}" for f in list(store.failures.values())[:MAX_REASONS]],
        )
    report = _report(store, start, calls0, runtime, encoded=run.encoded, resumed=len(done),
                     reused=False, seconds=run.seconds, windowed=run.windowed)
    store.finalize({**_profile(report, runtime), "time": run.encoder.deadline.to_dict()})
    return report


class _Run:
    """State of one extraction call: pending clips, counters, the failure streak."""

    def __init__(self, runtime, store: FeatureStore, manifest, config: ExtractionConfig, progress):
        self.encoder = _Encoder(runtime, manifest, config, f"the extraction of {store.key.task}/{store.key.split}")
        self.store, self.config, self.progress = store, config, progress
        self.pending: list[PendingClip] = []
        self.pending_failures: list[Failure] = []
        self.pending_bytes = 0
        self.encoded = self.windowed = self.streak = self.count = 0
        self.seconds = 0.0
        self.done_seconds = 0.0

    def skip(self, clip: ClipLike) -> None:
        self.count += 1
        self.done_seconds += len(clip.audio) / SAMPLE_RATE
        if self.progress:
            self.progress(self.count, self.done_seconds)

    def encode_buffer(self, buffer: list[tuple[int, ClipLike]]) -> None:
        key = self.store.key
        waves = [_prepare_audio(c, key.crop_seconds) for _, c in buffer]
        # encode in slices so a long buffer still reports progress and flushes shards as it goes
        order = sorted(range(len(buffer)), key=lambda i: len(waves[i]))
        step = self.config.batch_clips * 4
        for lo in range(0, len(order), step):
            idx = order[lo : lo + step]
            results = self.encoder.encode([buffer[i][1].key for i in idx], [waves[i] for i in idx], key.window_seconds)
            for i, res in zip(idx, results):
                self._collect(buffer[i][0], buffer[i][1], waves[i], res)
            if self.progress:
                self.progress(self.count, self.done_seconds)

    def _collect(self, ordinal: int, clip: ClipLike, wave: np.ndarray, res: np.ndarray | str) -> None:
        seconds = len(wave) / SAMPLE_RATE
        self.count += 1
        self.done_seconds += seconds
        self.seconds += seconds
        if isinstance(res, str):
            self.streak += 1
            self.pending_failures.append(Failure(clip.key, ordinal, seconds, res, tuple(clip.targets), clip.prompt))
            if self.streak >= self.config.max_consecutive_failures:
                raise SandboxError(
                    f"the encoder failed on {self.streak} clips in a row; giving up",
                    reasons=[f"{f.key}: {f.reason}" for f in self.pending_failures[-MAX_REASONS:]],
                )
            return
        self.streak = 0
        self.encoded += 1
        if len(window_bounds(len(wave), self.store.key.window_seconds)) > 1:
            self.windowed += 1
        feats = self.store.cast(clip.key, res)
        self.pending.append(PendingClip(clip.key, ordinal, feats, seconds, tuple(clip.targets), clip.prompt))
        self.pending_bytes += feats.nbytes
        if self.pending_bytes >= self.config.shard_bytes:
            self.flush()

    def flush(self) -> None:
        if self.pending or self.pending_failures:
            self.store.write_shard(self.pending, self.pending_failures)
        self.pending, self.pending_failures, self.pending_bytes = [], [], 0


def reused_report(store: FeatureStore) -> ExtractionReport:
    """The report of a complete store that is reused: nothing encoded, no encoder started."""
    return ExtractionReport(
        store=str(store.path), clips=len(store.entries), failed=len(store.failures), encoded=0, resumed=0,
        reused=True, audio_seconds=0.0, wall_seconds=0.0, encoder_calls=0, windowed=0,
        bytes_stored=store.bytes_stored,
    )


def _report(store, start, calls0, runtime, *, encoded, resumed, reused, seconds, windowed) -> ExtractionReport:
    return ExtractionReport(
        store=str(store.path), clips=len(store.entries), failed=len(store.failures), encoded=encoded,
        resumed=resumed, reused=reused, audio_seconds=seconds, wall_seconds=time.monotonic() - start,
        encoder_calls=runtime.calls - calls0, windowed=windowed, bytes_stored=store.bytes_stored,
    )


def _profile(report: ExtractionReport, runtime: Runtime) -> dict:
    """The profile.json of a finished store: time, throughput, memory and where it ran."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {
        **report.to_dict(),
        "peak_rss_mb": round(own, 1),
        "peak_rss_children_mb": round(children, 1),
        "runtime": getattr(runtime, "name", "?"),
        "isolation": getattr(runtime, "isolation", "?"),
        "device": getattr(runtime, "device", "?"),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


# ---- spot re-extraction ----------------------------------------------------------------------
def sample_keys(store: FeatureStore, *, fraction: float | None = None, n: int | None = None,
                seed: int = 0) -> list[str]:
    """A seeded random subset of the stored clip keys (so callers can load just those clips)."""
    if (fraction is None) == (n is None):
        raise ConfigError("give exactly one of fraction and n for the spot check")
    keys = sorted(store.entries)
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise ConfigError(f"spot-check fraction must be in (0, 1], got {fraction}")
        n = max(1, math.ceil(fraction * len(keys)))
    if n is None or n < 0:
        raise ConfigError(f"spot-check n must be non-negative, got {n}")
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(keys), size=min(n, len(keys)), replace=False) if keys else []
    return [keys[i] for i in sorted(picked)]


def spot_check(
    runtime: Runtime,
    clips_by_key: Mapping[str, ClipLike],
    store: FeatureStore,
    manifest: Manifest,
    *,
    fraction: float | None = None,
    n: int | None = None,
    seed: int = 0,
    rtol: float = 1e-2,
    atol: float = 1e-2,
    config: ExtractionConfig = ExtractionConfig(),
) -> SpotCheckReport:
    """Re-extract a seeded random subset of stored clips and compare with what was stored.

    Catches an encoder that behaves differently when measured (non-deterministic, state across
    calls, batch-dependent). A value passes when ``|new - stored| <= atol * rms + rtol * |stored|``,
    ``rms`` being the clip's stored feature RMS (so ``atol`` is scale-free); the new features are
    first rounded to the store dtype, so float16 storage alone never fails it.

    Args:
        runtime: the same submission's running encoder.
        clips_by_key: clip key -> Clip; only the sampled keys are read (a lazy mapping works).
        store: the store to check (complete or not).
        manifest: for the output checks.
        fraction: share of stored clips to re-extract; or
        n: number of clips to re-extract; with neither, every stored clip in ``clips_by_key`` is
            re-extracted (for callers that picked the sample with `sample_keys` and loaded only it).
        seed: picks the subset (`sample_keys`) when fraction or n is given.
        rtol, atol: tolerance, see above.
        config: batching and output checks.

    Returns:
        The report: clips checked, largest difference, encoder calls.

    Raises:
        SandboxError: a clip differs beyond tolerance (names the clip and the max difference), its
            re-extraction fails, or breaks the contract.
        DataError: a sampled key is missing from ``clips_by_key``.
    """
    start, calls0 = time.monotonic(), runtime.calls
    if fraction is None and n is None:  # the caller sampled already (sample_keys) and passed just those clips
        keys = sorted(k for k in clips_by_key if k in store.entries)
        if not keys:
            raise DataError("spot check: none of the clips given is in the feature store")
    else:
        keys = sample_keys(store, fraction=fraction, n=n, seed=seed)
    missing = [k for k in keys if k not in clips_by_key]
    if missing:
        raise DataError(f"spot check: {len(missing)} sampled clips are not in the data given (e.g. {missing[0]!r})")
    dtype = numpy_dtype(store.key.dtype)
    waves = [_prepare_audio(clips_by_key[k], store.key.crop_seconds) for k in keys]
    encoder = _Encoder(runtime, manifest, config, "the spot check")
    results = encoder.encode(keys, waves, store.key.window_seconds) if keys else []
    max_diff, worst, worst_excess = 0.0, None, -math.inf
    for k, res in zip(keys, results):
        if isinstance(res, str):
            raise SandboxError(f"spot re-extraction of clip {k} failed although it was encoded before", reasons=[res])
        stored = store.features(k).astype(np.float32)
        new = res.astype(dtype).astype(np.float32)
        if new.shape != stored.shape:
            raise SandboxError(
                f"spot re-extraction of clip {k} differs from the stored features: shape {list(new.shape)} "
                f"now, {list(stored.shape)} stored"
            )
        diff = np.abs(new - stored)
        rms = float(np.sqrt(np.mean(stored**2))) if stored.size else 0.0
        excess = diff - (atol * rms + rtol * np.abs(stored))
        clip_max = float(diff.max()) if diff.size else 0.0
        max_diff = max(max_diff, clip_max)
        clip_excess = float(excess.max()) if excess.size else -math.inf
        if clip_excess > worst_excess:
            worst, worst_excess = k, clip_excess
        if clip_excess > 0:
            raise SandboxError(
                f"spot re-extraction of clip {k} differs from the stored features: max |diff| = {clip_max:.4g} "
                f"(feature RMS {rms:.4g}; tolerance atol={atol:g} x RMS + rtol={rtol:g} x |value|)",
                reasons=["the encoder must give the same features for the same audio every time it is run"],
            )
    return SpotCheckReport(tuple(keys), max_diff, worst, runtime.calls - calls0, time.monotonic() - start)



def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"
