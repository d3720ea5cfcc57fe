"""The ONNX runtime and the probe, on tiny real ONNX graphs run by real onnxruntime."""

from __future__ import annotations

import json
import time
from dataclasses import replace

import numpy as np
import pytest
from resources.encoders.onnx_models import make_onnx

from evaluator.errors import SandboxError, SandboxTimeout, SubmissionError
from evaluator.sandbox import Limits, open_runtime
from evaluator.sandbox.base import TimeBudget
from evaluator.submission.manifest import Manifest
from evaluator.submission.probe import ProbeConfig, ProbeReport, probe_lengths, run_probe

FAST = ProbeConfig(max_seconds=3.0)  # same checks, shorter clips


def manifest_for(
    *, dim=8, hop_ms=20.0, mask_input=True, mask_output=True, dtype="float32", **extra
) -> Manifest:
    onnx = {
        "model": "model.onnx",
        "audio_input": "audio",
        "features_output": "features",
        "mask_input": "audio_attention_mask" if mask_input else None,
        "mask_output": "frame_mask" if mask_output else None,
    }
    return Manifest.from_dict(
        {
            "schema_version": 1,
            "name": "tiny",
            "team": "tests",
            "kind": "onnx",
            "sample_rate": 16000,
            "output_dim": dim,
            "frame_hop_ms": hop_ms,
            "max_audio_seconds": 30,
            "output_dtype": dtype,
            "onnx": onnx,
            "files": [],
            **extra,
        }
    )


def start(tmp_path, manifest=None, limits=None, **model):
    make_onnx(tmp_path / "model.onnx", **model)
    if manifest is None:
        manifest = manifest_for(
            mask_input=model.get("mask_input", True), mask_output=model.get("mask_output", True)
        )
    return open_runtime(tmp_path, manifest, limits or Limits())


def failed(report) -> set[str]:
    return {c.name for c in report.checks if not c.ok}


class TestRuntime:
    def test_frames_follow_the_mask_and_order_is_kept(self, tmp_path):
        clips = [np.full(n, 0.1, np.float32) for n in (16000, 3200, 0, 640, 16001)]
        with start(tmp_path) as rt:
            out = rt.encode(clips)
            alone = [rt.encode([c])[0] for c in clips]
            assert rt.name == "onnx" and rt.device == "cpu" and rt.calls == 10
        assert [o.shape for o in out] == [(50, 8), (10, 8), (0, 8), (2, 8), (51, 8)]
        assert all(o.dtype == np.float32 for o in out)
        for a, b in zip(out, alone):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

    def test_chunks_many_clips(self, tmp_path):
        make_onnx(tmp_path / "model.onnx")
        from evaluator.sandbox.onnx_runtime import OnnxRuntime

        clips = [
            np.random.default_rng(i).standard_normal(320 * (i + 1)).astype(np.float32) for i in range(11)
        ]
        with OnnxRuntime(tmp_path, manifest_for(), Limits(), max_batch_items=3) as rt:
            out = rt.encode(clips)
        assert [o.shape[0] for o in out] == list(range(1, 12))

    def test_without_mask_output_trims_to_the_hop(self, tmp_path):
        with start(tmp_path, mask_output=False) as rt:
            (a, b) = rt.encode([np.ones(3200, np.float32), np.ones(1000, np.float32)])
        assert a.shape == (10, 8) and b.shape == (4, 8)  # ceil(1000 / 320) = 4

    def test_declared_hop_too_long_is_refused_not_silently_cut(self, tmp_path):
        m = manifest_for(hop_ms=40.0, mask_output=False)
        with start(tmp_path, m, mask_output=False) as rt, pytest.raises(SandboxError, match="implies about"):
            rt.encode([np.ones(32000, np.float32)])

    def test_sample_mask_returned_as_frame_mask(self, tmp_path):
        with (
            start(tmp_path, sample_mask_out=True) as rt,
            pytest.raises(SandboxError, match=r"length 16000 != T = 50"),
        ):
            rt.encode([np.ones(16000, np.float32)])

    def test_rank2_output(self, tmp_path):
        with start(tmp_path, rank2=True) as rt, pytest.raises(SandboxError, match=r"rank 3"):
            rt.encode([np.ones(16000, np.float32)])

    def test_dtype_and_names_checked_at_open(self, tmp_path):
        with pytest.raises(SubmissionError) as e:
            start(tmp_path, manifest_for(dtype="float16"))
        assert "manifest output_dtype is float16" in " ".join(e.value.reasons)
        bad = manifest_for()
        bad = replace(bad, onnx=replace(bad.onnx, audio_input="wave"))
        with pytest.raises(SubmissionError) as e:
            start(tmp_path, bad)
        assert any("'wave'" in r for r in e.value.reasons)

    def test_float16_output_is_returned_as_float32(self, tmp_path):
        with start(tmp_path, manifest_for(dtype="float16"), out_float16=True) as rt:
            (out,) = rt.encode([np.ones(1600, np.float32)])
        assert out.dtype == np.float32

    def test_external_data_beside_the_model_is_allowed(self, tmp_path):
        with start(tmp_path, external_data=True) as rt:
            (out,) = rt.encode([np.ones(16000, np.float32)])
        assert (tmp_path / "model.onnx.data").exists() and out.shape[0] == 50

    def test_garbage_model_refused(self, tmp_path):
        (tmp_path / "model.onnx").write_bytes(b"not a protobuf" * 10)
        with pytest.raises(SubmissionError, match="not a readable ONNX model"):
            open_runtime(tmp_path, manifest_for(), Limits())

    def test_wall_clock_limit_stops_a_run(self, tmp_path):
        with start(tmp_path, limits=Limits(wall_seconds=0.3), loop_iterations=50_000_000) as rt:
            t0 = time.monotonic()
            with pytest.raises(SandboxError, match="wall-clock limit"):
                rt.encode([np.ones(1600, np.float32)])
            assert time.monotonic() - t0 < 10

    def test_a_hung_encoder_ends_the_probe_at_its_first_timeout(self, tmp_path):
        # 600 s per call would hold validate for 8 x 600 s; the budget ends it within its floor
        budget = TimeBudget(seconds_per_audio_second=0.01, floor_seconds=2.0)
        with start(tmp_path, loop_iterations=10**12) as rt:
            t0 = time.monotonic()
            report = run_probe(rt, manifest_for(), replace(FAST, time_budget=budget))
            took = time.monotonic() - t0
        assert [c.name for c in report.checks] == ["time"] and not report.ok
        assert "ran past what was left of the time budget" in report.reasons[0]
        assert "stops at the first call" in report.reasons[0]
        assert took < 15 and report.time["limit_s"] < 3

    def test_the_budget_caps_one_call_below_its_wall_limit(self, tmp_path):
        with start(tmp_path, loop_iterations=10**12) as rt:
            t0 = time.monotonic()
            with pytest.raises(SandboxTimeout, match="time budget"):
                rt.encode([np.ones(1600, np.float32)], timeout=0.5)
            assert time.monotonic() - t0 < 10

    def test_gpu_request_without_gpu(self, tmp_path):
        from evaluator.errors import EnvironmentUnavailable
        from evaluator.sandbox.onnx_runtime import cuda_usable

        if cuda_usable():
            pytest.skip("this machine has a GPU")
        with pytest.raises(EnvironmentUnavailable, match="GPU"):
            start(tmp_path, limits=Limits(gpu=True))


class TestProbe:
    def test_lengths(self):
        m = manifest_for()
        lengths = probe_lengths(m, ProbeConfig())
        assert len(set(lengths)) >= 5 and lengths[0] == 0.1 and lengths[-1] == 30
        assert max(probe_lengths(replace(m, max_audio_seconds=4), ProbeConfig())) == 4

    def test_good_encoder_passes(self, tmp_path):
        with start(tmp_path) as rt:
            report = run_probe(rt, manifest_for(), FAST)
        assert report.ok, report.reasons
        assert report.frames[-1] == 150 and report.seconds_per_audio_second > 0
        assert {c.name for c in report.checks} == {
            "runs",
            "shape",
            "finite",
            "frame_rate",
            "padding",
            "deterministic",
            "speed",
            "memory",
        }
        assert report.to_dict()["ok"] is True
        # what a run records in the submission's folder reads back as the same report (through JSON)
        assert ProbeReport.from_dict(json.loads(json.dumps(report.to_dict()))) == report
        assert report.batching == "padded" and report.padding_cause is None
        assert report.fixed_frames is None and report.feature_dtype == "float16"
        assert 0 < report.feature_peak < 100

    @pytest.mark.parametrize(
        "model, manifest_kw, check, words",
        [
            ({"nan": True}, {}, "finite", "NaN"),
            ({"random": True}, {}, "deterministic", "differ"),
            ({"rank2": True}, {}, "runs", "rank 3"),
            ({"sample_mask_out": True}, {}, "runs", "frame mask length"),
            ({}, {"dim": 16}, "runs", "manifest output_dim is 16"),
            ({}, {"hop_ms": 10.0}, "frame_rate", "frame_hop_ms=10"),
        ],
    )
    def test_broken_encoder_refused_by_its_check(self, tmp_path, model, manifest_kw, check, words):
        with start(tmp_path, manifest_for(**manifest_kw), **model) as rt:
            report = run_probe(rt, manifest_for(**manifest_kw), FAST)
        assert not report.ok
        assert check in failed(report)
        assert any(r.startswith(check + ":") and words in r for r in report.reasons), report.reasons

    def test_memory_budget(self, tmp_path):
        m = manifest_for(resources={"memory_mb": 64})
        with start(tmp_path, m) as rt:
            report = run_probe(rt, m, FAST)
        assert report.peak_memory_mb is not None and report.peak_memory_mb < 64  # a tiny conv stays small

    def test_speed_budget(self, tmp_path):
        with start(tmp_path) as rt:
            report = run_probe(rt, manifest_for(), replace(FAST, max_seconds_per_audio_second=1e-9))
        assert failed(report) == {"speed"}


class TestMeasured:
    """What the probe measures instead of refusing: padding sensitivity, output range, fixed frames."""

    def test_normalisation_over_time_is_encoded_in_equal_length_batches(self, tmp_path):
        with start(tmp_path, ignores_mask=True) as rt:
            report = run_probe(rt, manifest_for(), FAST)
        assert report.ok, report.reasons
        assert report.batching == "equal_length"
        assert report.padding_max_rel_diff > FAST.padding_rtol
        assert "normalisation over time" in report.padding_cause
        detail = next(c.detail for c in report.checks if c.name == "padding")
        assert "equal-length" in detail and "never reaches them" in detail
        assert report.unbatched_cost is not None and report.unbatched_cost > 0
        assert report.measured()["batching"] == "equal_length"

    def test_reflect_padding_is_named_as_an_edge_effect(self, tmp_path):
        with start(tmp_path, reflect_edge=True) as rt:
            report = run_probe(rt, manifest_for(), FAST)
        assert report.ok, report.reasons
        assert report.batching == "equal_length"
        assert report.padding_cause.startswith("only the last 1 frame(s) change")

    def test_items_that_change_each_other_are_encoded_alone(self, tmp_path):
        with start(tmp_path, batch_mean=True) as rt:
            report = run_probe(rt, manifest_for(), FAST)
        assert report.ok, report.reasons
        assert report.batching == "alone" and "state shared across the batch" in report.padding_cause

    def test_an_encoder_that_fails_on_batches_is_run_alone(self, tmp_path):
        m = manifest_for(mask_output=False)
        with start(tmp_path, m, batch_one=True, mask_output=False) as rt:
            report = run_probe(rt, m, FAST)
        assert report.ok, report.reasons
        assert report.batching == "alone"
        assert report.padding_cause.startswith("batched calls fail (features output has batch size 1")
        assert report.padding_cause.endswith("batches of equal-length clips fail too")

    def test_large_outputs_choose_float32_storage(self, tmp_path):
        with start(tmp_path, gain=5000.0) as rt:
            report = run_probe(rt, manifest_for(), FAST)
        assert report.ok, report.reasons
        assert report.feature_peak > 65504 / 8 and report.feature_dtype == "float32"

    def test_clip_level_encoder_with_frames_fixed(self, tmp_path):
        m = manifest_for(mask_output=False, schema_version=2, frames="fixed")
        m = Manifest.from_dict({k: v for k, v in m.to_dict().items() if k != "frame_hop_ms"})
        with start(tmp_path, m, clip_level=True, mask_output=False) as rt:
            report = run_probe(rt, m, FAST)
            assert [o.shape for o in rt.encode([np.ones(160, np.float32), np.ones(48000, np.float32)])] == [
                (1, 8), (1, 8)]
        assert report.ok, report.reasons
        assert report.fixed_frames == 1 and set(report.frames) == {1}

    def test_fixed_count_declared_as_following_audio_suggests_frames_fixed(self, tmp_path):
        m = manifest_for(mask_output=False)
        with start(tmp_path, m, clip_level=True, mask_output=False) as rt:
            report = run_probe(rt, m, FAST)
        assert failed(report) == {"frame_rate"}
        assert '"frames": "fixed"' in report.reasons[0]

    def test_frames_fixed_but_varying_counts_is_refused(self, tmp_path):
        m = manifest_for(schema_version=2, frames="fixed")
        with start(tmp_path, m) as rt:
            report = run_probe(rt, m, FAST)
        assert failed(report) == {"frame_rate"}
        assert "different frame counts" in report.reasons[0]
