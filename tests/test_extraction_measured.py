"""Extraction of encoders the probe measured rather than refused: padding-sensitive ones are encoded
without padding, fixed-frame ones keep every frame (window by window), through real onnxruntime."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from resources.encoders.onnx_models import make_onnx

from evaluator.errors import SandboxError
from evaluator.extraction import ExtractionConfig, extract, output_problems, spot_check
from evaluator.features import FeatureStore, StoreKey
from evaluator.sandbox import Limits, open_runtime
from evaluator.submission.manifest import Manifest
from evaluator.submission.probe import ProbeConfig, run_probe

SR = 16000
SUB = "ab" * 32


@dataclass
class Clip:
    key: str
    audio: np.ndarray
    targets: tuple[str, ...] = ("x",)
    prompt: str | None = None


class CountingRuntime:
    """The real runtime, recording the clip lengths (s) of every encode call."""

    def __init__(self, runtime):
        self.runtime, self.batches = runtime, []

    def encode(self, waves, *, timeout=None):
        self.batches.append([round(len(w) / SR, 2) for w in waves])
        return self.runtime.encode(waves, timeout=timeout)

    def __getattr__(self, name):
        return getattr(self.runtime, name)


def manifest(*, fixed: bool = False, mask_output: bool = True, max_seconds: float = 30.0) -> Manifest:
    doc = {
        "schema_version": 2, "name": "tiny", "team": "tests", "kind": "onnx", "sample_rate": SR,
        "output_dim": 8, "max_audio_seconds": max_seconds, "output_dtype": "float32", "files": [],
        "onnx": {"model": "model.onnx", "audio_input": "audio", "mask_input": "audio_attention_mask",
                 "features_output": "features", "mask_output": "frame_mask" if mask_output else None},
    }
    doc.update({"frames": "fixed"} if fixed else {"frame_hop_ms": 20.0})
    return Manifest.from_dict(doc)


def clips(lengths_s, seed=0):
    rng = np.random.default_rng(seed)
    return [Clip(f"c{i:03d}", (0.2 * rng.standard_normal(int(s * SR))).astype(np.float32))
            for i, s in enumerate(lengths_s)]


def key(**kw):
    return StoreKey(**{"submission_sha256": SUB, "data_digests": ("cd" * 32,), "task": "t", "split": "train",
                       "window_seconds": 30.0, **kw})


LENGTHS = [0.5, 1.3, 0.5, 2.1, 0.9, 1.3, 0.5]


def test_padding_sensitive_encoder_stores_what_each_clip_gives_alone(tmp_path):
    make_onnx(tmp_path / "model.onnx", ignores_mask=True)  # normalises over the padded length
    m, data = manifest(), clips(LENGTHS)
    with open_runtime(tmp_path, m, Limits()) as rt:
        verdict = run_probe(rt, m, ProbeConfig(max_seconds=3.0))
        assert verdict.ok and verdict.batching == "equal_length"
        alone = {c.key: rt.encode([c.audio])[0] for c in data}
        padded = FeatureStore.open(tmp_path / "padded", key(dtype="float32"))
        extract(rt, data, padded, m, ExtractionConfig(batch_clips=8))
        safe = FeatureStore.open(tmp_path / "safe", key(dtype="float32"))
        counted = CountingRuntime(rt)
        report = extract(counted, data, safe, m, ExtractionConfig(batch_clips=8, batching=verdict.batching))
        # four distinct lengths: four calls, the clips of equal length share theirs
        assert report.encoder_calls == len(data)
        assert sorted(counted.batches) == sorted([[0.5] * 3, [0.9], [1.3] * 2, [2.1]])
        assert spot_check(rt, {c.key: c for c in data}, safe, m, n=3, config=ExtractionConfig(
            batching=verdict.batching)).checked
    for c in data:
        np.testing.assert_allclose(safe.features(c.key), alone[c.key], rtol=1e-5, atol=1e-6)
    # the plain padded batching would have stored other features for the shorter clips
    assert any(not np.allclose(padded.features(c.key), alone[c.key], atol=1e-4) for c in data)


def test_alone_batching_sends_one_clip_per_call(tmp_path):
    make_onnx(tmp_path / "model.onnx", batch_mean=True)
    m, data = manifest(), clips([0.5] * 4)
    with open_runtime(tmp_path, m, Limits()) as rt:
        verdict = run_probe(rt, m, ProbeConfig(max_seconds=3.0))
        assert verdict.batching == "alone"
        alone = [rt.encode([c.audio])[0] for c in data]
        store = FeatureStore.open(tmp_path / "s", key(dtype="float32"))
        extract(rt, data, store, m, ExtractionConfig(batching="alone"))
    for c, a in zip(data, alone):
        np.testing.assert_allclose(store.features(c.key), a, rtol=1e-5, atol=1e-6)


def test_clip_level_encoder_gives_one_frame_per_window(tmp_path):
    make_onnx(tmp_path / "model.onnx", clip_level=True, mask_output=False)
    m = manifest(fixed=True, mask_output=False, max_seconds=1.0)
    data = clips([0.3, 1.0, 2.5])  # the 2.5 s clip is encoded in 3 windows of <= 1 s
    with open_runtime(tmp_path, m, Limits()) as rt:
        verdict = run_probe(rt, m, ProbeConfig(max_seconds=1.0))
        assert verdict.ok, verdict.reasons
        cfg = ExtractionConfig(fixed_frames=verdict.fixed_frames, batching=verdict.batching)
        store = FeatureStore.open(tmp_path / "s", key(window_seconds=1.0))
        report = extract(rt, data, store, m, cfg)
    assert [store.entries[c.key].frames for c in data] == [1, 1, 3] and report.windowed == 1


def test_fixed_count_other_than_the_probes_breaks_the_contract():
    m = manifest(fixed=True, mask_output=False)
    cfg = ExtractionConfig(fixed_frames=1500)
    assert output_problems(np.zeros((1500, 8), np.float32), 800, m, cfg) == []
    problems = output_problems(np.zeros((750, 8), np.float32), 800, m, cfg)
    assert problems and "gave 1500 to the probe" in problems[0]


def test_a_fixed_encoder_returning_other_counts_fails_extraction(tmp_path):
    make_onnx(tmp_path / "model.onnx", mask_output=False)  # frames follow the audio after all
    m = manifest(fixed=True, mask_output=False)
    with open_runtime(tmp_path, m, Limits()) as rt, pytest.raises(SandboxError, match="breaks the contract"):
        extract(rt, clips([0.5, 1.0]), FeatureStore.open(tmp_path / "s", key()), m,
                ExtractionConfig(fixed_frames=25))


def test_a_hung_encoder_fails_extraction_within_its_budget_not_calls_x_wall(tmp_path):
    import time

    from evaluator.errors import SandboxTimeout
    from evaluator.sandbox.base import TimeBudget

    make_onnx(tmp_path / "model.onnx", loop_iterations=10**12)
    m = manifest()
    cfg = ExtractionConfig(batch_clips=2, time_budget=TimeBudget(seconds_per_audio_second=0.1, floor_seconds=2.0))
    store = FeatureStore.open(tmp_path / "s", key())
    with open_runtime(tmp_path, m, Limits(wall_seconds=600)) as rt:
        t0 = time.monotonic()
        with pytest.raises(SandboxTimeout, match="the extraction of t/train ran past its time budget"):
            extract(rt, clips([0.5] * 6), store, m, cfg)
        assert time.monotonic() - t0 < 20  # the budget (2 s + 0.1 s per audio-second), not 3 calls x 600 s
