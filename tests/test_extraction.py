"""Extraction through a real onnxruntime session: once per clip, resumable, checked, spot-checked.

The encoders are tiny ONNX graphs built here with onnx.helper: 20 ms framing by slice + reshape and
a fixed projection matrix; variants add noise (RandomNormalLike), emit NaN, have the wrong D, or
refuse clips whose length is not a whole number of frames.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from evaluator.errors import DataError, SandboxError
from evaluator.extraction import (
    ExtractionConfig,
    expected_frames,
    extract,
    output_problems,
    sample_keys,
    spot_check,
    window_bounds,
)
from evaluator.features import FeatureStore, StoreKey
from evaluator.submission.manifest import Manifest

SR = 16000
HOP = 320  # samples per frame (20 ms)
DIM = 8
SUB = "ab" * 32
DATA = ("cd" * 32,)


# ---- tiny real encoders ----------------------------------------------------------------------
def build_encoder(path: Path, *, variant: str = "plain", dim: int = DIM) -> Path:
    """audio [B, S], mask [B, S] -> features [B, T, dim], frame_mask [B, T] with T = S // HOP."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((HOP, dim)) / math.sqrt(HOP)).astype(np.float32)
    init = [
        numpy_helper.from_array(w, "W"),
        numpy_helper.from_array(np.array(HOP, dtype=np.int64), "hop"),
        numpy_helper.from_array(np.array([0], dtype=np.int64), "zero"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "one"),
        numpy_helper.from_array(np.array([0, -1, HOP], dtype=np.int64), "frame_shape"),
    ]
    if variant == "nan":
        init.append(numpy_helper.from_array(np.array(float("nan"), dtype=np.float32), "nan"))
    nodes = [
        helper.make_node("Shape", ["audio"], ["shape"]),
        helper.make_node("Gather", ["shape", "one"], ["S1"], axis=0),
        helper.make_node("Div", ["S1", "hop"], ["T1"]),
        helper.make_node("Mul", ["T1", "hop"], ["N1"]),
    ]
    if variant == "strict":  # a frame-aligned length only: other lengths make Reshape fail
        nodes += [helper.make_node("Identity", ["audio"], ["cut"]), helper.make_node("Identity", ["mask"], ["mcut"])]
    else:
        nodes += [
            helper.make_node("Slice", ["audio", "zero", "N1", "one"], ["cut"]),
            helper.make_node("Slice", ["mask", "zero", "N1", "one"], ["mcut"]),
        ]
    nodes += [
        helper.make_node("Reshape", ["cut", "frame_shape"], ["frames"]),
        helper.make_node("Reshape", ["mcut", "frame_shape"], ["mframes"]),
        helper.make_node("ReduceMin", ["mframes"], ["frame_mask"], axes=[2], keepdims=0),  # whole frames only
        helper.make_node("MatMul", ["frames", "W"], ["proj"]),
    ]
    if variant == "random":
        nodes += [helper.make_node("RandomNormalLike", ["proj"], ["noise"], scale=0.5),
                  helper.make_node("Add", ["proj", "noise"], ["features"])]
    elif variant == "nan":
        nodes += [helper.make_node("Mul", ["proj", "nan"], ["features"])]
    else:
        nodes += [helper.make_node("Identity", ["proj"], ["features"])]
    graph = helper.make_graph(
        nodes, f"enc_{variant}",
        [helper.make_tensor_value_info("audio", TensorProto.FLOAT, ["B", "S"]),
         helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["B", "S"])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["B", "T", dim]),
         helper.make_tensor_value_info("frame_mask", TensorProto.FLOAT, ["B", "T"])],
        init,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


class SessionRuntime:
    """A minimal in-process Runtime over a real onnxruntime session (no sandbox: tests only)."""

    name, isolation, device = "onnx", "none (in-process test runtime)", "cpu"

    def __init__(self, model: Path):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        self.session = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
        self.calls = 0
        self.batches = 0

    def encode(self, waves, *, timeout=None):
        self.calls += len(waves)
        self.batches += 1
        audio = np.zeros((len(waves), max(len(w) for w in waves)), np.float32)
        mask = np.zeros_like(audio)
        for i, w in enumerate(waves):
            audio[i, : len(w)], mask[i, : len(w)] = w, 1.0
        try:
            feats, frame_mask = self.session.run(None, {"audio": audio, "mask": mask})
        except Exception as e:  # onnxruntime's own error types
            raise SandboxError(f"the ONNX encoder failed: {e}") from e
        return [feats[i][frame_mask[i] > 0] for i in range(len(waves))]

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@dataclass(frozen=True)
class Clip:
    key: str
    audio: np.ndarray
    targets: tuple[str, ...]
    prompt: str | None = None


def make_clips(n: int, *, seed: int = 1, frame_aligned: bool = False, seconds=(0.3, 2.5)) -> list[Clip]:
    rng = np.random.default_rng(seed)
    clips = []
    for i in range(n):
        s = int(rng.uniform(*seconds) * SR)
        if frame_aligned:
            s = max(HOP, s // HOP * HOP)
        t = np.arange(s) / SR
        audio = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 2000) * t) + 0.05 * rng.standard_normal(s)
        clips.append(Clip(f"shard-000.tar.gz/{i:05d}", audio.astype(np.float32), (f"label{i % 3}",)))
    return clips


def make_manifest(*, dim: int = DIM, max_seconds: float = 30.0) -> Manifest:
    return Manifest.from_dict({
        "schema_version": 1, "name": "tiny", "team": "tests", "kind": "onnx", "sample_rate": SR,
        "output_dim": dim, "frame_hop_ms": 1000 * HOP / SR, "max_audio_seconds": max_seconds,
        "output_dtype": "float32", "files": [],
        "onnx": {"model": "model.onnx", "audio_input": "audio", "mask_input": "mask",
                 "features_output": "features", "mask_output": "frame_mask"},
    })


def make_key(**kw) -> StoreKey:
    base = {"submission_sha256": SUB, "data_digests": DATA, "task": "tiny", "split": "train", "window_seconds": 30.0}
    return StoreKey(**{**base, **kw})


SMALL = ExtractionConfig(batch_clips=4, sort_buffer=8, shard_bytes=4096)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    return {v: build_encoder(d / f"{v}.onnx", variant=v) for v in ("plain", "random", "nan", "strict")} | {
        "wide": build_encoder(d / "wide.onnx", dim=DIM + 1)
    }


# ---- once per clip, resume, reuse ------------------------------------------------------------
class TestOncePerClip:
    def test_extract_stores_every_clip_and_a_second_run_does_no_encoder_work(self, tmp_path, models):
        clips, manifest = make_clips(20), make_manifest()
        rt = SessionRuntime(models["plain"])
        store = FeatureStore.open(tmp_path, make_key())
        report = extract(rt, clips, store, manifest, SMALL)
        assert (report.clips, report.encoded, report.failed, report.encoder_calls) == (20, 20, 0, 20)
        assert rt.calls == 20 and rt.batches >= 5  # batched, at most 4 clips a call
        assert store.complete and report.bytes_stored == store.bytes_stored > 0
        assert len(list((store.path / "shards").glob("*.npy"))) > 1  # several shards (4 KiB each)
        assert report.audio_seconds == pytest.approx(sum(len(c.audio) for c in clips) / SR)
        assert store.profile["encoder_calls"] == 20 and store.profile["audio_seconds_per_second"] > 0
        # what is stored is what the encoder gives for the clip alone, rounded to float16
        for c in clips[:3]:
            alone = rt.encode([c.audio])[0]
            np.testing.assert_array_equal(store.features(c.key), alone.astype(np.float16))
        # second run: a fresh runtime, the same key -> zero encoder calls, clips not even read
        rt2 = SessionRuntime(models["plain"])

        def never():
            raise AssertionError("a complete store must not read the clips")
            yield  # pragma: no cover

        again = extract(rt2, never(), FeatureStore.open(tmp_path, make_key()), manifest, SMALL)
        assert again.reused and again.encoder_calls == 0 and rt2.calls == 0 and again.clips == 20

    def test_interrupted_extraction_resumes_with_only_the_missing_clips(self, tmp_path, models):
        clips, manifest = make_clips(24), make_manifest()

        def interrupted():
            for i, c in enumerate(clips):
                if i == 17:
                    raise KeyboardInterrupt  # the operator pressed ^C mid-extraction
                yield c

        rt = SessionRuntime(models["plain"])
        store = FeatureStore.open(tmp_path, make_key())
        with pytest.raises(KeyboardInterrupt):
            extract(rt, interrupted(), store, manifest, SMALL)
        assert not store.complete
        kept = FeatureStore.open(tmp_path, make_key()).done_keys()
        assert 0 < len(kept) < 24 and rt.calls == len(kept)  # finished work was kept on disk
        # a shard array without its index part (a crash between the two renames) is redone
        (store.path / "shards" / "999999.npy").write_bytes(b"partial")
        rt2 = SessionRuntime(models["plain"])
        report = extract(rt2, clips, FeatureStore.open(tmp_path, make_key()), manifest, SMALL)
        assert rt2.calls == 24 - len(kept) == report.encoded and report.resumed == len(kept)
        assert not (store.path / "shards" / "999999.npy").exists()
        done = FeatureStore.open(tmp_path, make_key())
        assert done.complete and len(done.entries) == 24
        ds = done.dataset(prompt="p")
        assert [ds.key(i) for i in range(len(ds))] == [c.key for c in clips]  # data order, not batch order

    @pytest.mark.parametrize("change", [{"submission_sha256": "ef" * 32}, {"dtype": "float32"},
                                        {"data_digests": ("00" * 32,)}])
    def test_a_changed_key_recomputes(self, tmp_path, models, change):
        clips, manifest = make_clips(6), make_manifest()
        extract(SessionRuntime(models["plain"]), clips, FeatureStore.open(tmp_path, make_key()), manifest, SMALL)
        rt = SessionRuntime(models["plain"])
        store = FeatureStore.open(tmp_path, make_key(**change))
        report = extract(rt, clips, store, manifest, SMALL)
        assert rt.calls == 6 and not report.reused
        assert len(FeatureStore.scan(tmp_path)) == 2
        if change.get("dtype") == "float32":
            assert store.features(clips[0].key).dtype == np.float32

    def test_duplicate_clip_keys_are_refused(self, tmp_path, models):
        clips = make_clips(3)
        with pytest.raises(DataError, match="appears twice"):
            extract(SessionRuntime(models["plain"]), clips + clips[:1], FeatureStore.open(tmp_path, make_key()),
                    make_manifest(), SMALL)


# ---- long clips ------------------------------------------------------------------------------
class TestWindows:
    def test_window_bounds_are_equal_and_cover_the_clip(self):
        assert window_bounds(100, None) == [(0, 100)]
        b = window_bounds(int(2.5 * SR), 1.0)
        assert len(b) == 3 and b[0][0] == 0 and b[-1][1] == int(2.5 * SR)
        assert all(e - s <= SR for s, e in b) and all(b[i][1] == b[i + 1][0] for i in range(2))

    def test_long_clips_are_encoded_in_windows_and_concatenated(self, tmp_path, models):
        clips = make_clips(4, seconds=(2.6, 3.4), frame_aligned=True)
        clips = [Clip(c.key, c.audio[: len(c.audio) // 3 * 3], c.targets) for c in clips]  # 3 equal windows
        rt = SessionRuntime(models["plain"])
        store = FeatureStore.open(tmp_path, make_key(window_seconds=1.2))
        report = extract(rt, clips, store, make_manifest(max_seconds=1.2), SMALL)
        assert report.windowed == 4 and report.encoder_calls == 12  # every window is its own item
        for c in clips:
            third = len(c.audio) // 3
            parts = [rt.encode([c.audio[i * third : (i + 1) * third]])[0] for i in range(3)]
            np.testing.assert_array_equal(store.features(c.key), np.concatenate(parts).astype(np.float16))
            assert abs(store.entries[c.key].frames - expected_frames(len(c.audio), make_manifest())) <= 3


# ---- bad outputs and failing clips -----------------------------------------------------------
class TestRefusals:
    def test_nan_features_fail_the_submission_naming_the_clip(self, tmp_path, models):
        with pytest.raises(SandboxError, match="breaks the contract") as e:
            extract(SessionRuntime(models["nan"]), make_clips(5), FeatureStore.open(tmp_path, make_key()),
                    make_manifest(), SMALL)
        assert "shard-000.tar.gz/" in str(e.value) and any("NaN" in r for r in e.value.reasons)

    def test_wrong_dim_fails_with_expected_and_got(self, tmp_path, models):
        with pytest.raises(SandboxError) as e:
            extract(SessionRuntime(models["wide"]), make_clips(3), FeatureStore.open(tmp_path, make_key()),
                    make_manifest(), SMALL)
        assert any(f"expected D = output_dim = {DIM}, got D = {DIM + 1}" in r for r in e.value.reasons)

    def test_output_checks(self):
        m, cfg = make_manifest(), ExtractionConfig()
        ok = np.zeros((50, DIM), np.float32)
        assert output_problems(ok, SR, m, cfg) == []
        assert "expected shape" in output_problems(np.zeros((50,), np.float32), SR, m, cfg)[0]
        assert "T = 5 frames" in output_problems(np.zeros((5, DIM), np.float32), SR, m, cfg)[0]  # wrong hop
        assert "float64" in output_problems(np.zeros((50, DIM)), SR, m, cfg)[0]
        inf = ok.copy()
        inf[3, 2] = np.inf
        assert "1 of 400 values" in output_problems(inf, SR, m, cfg)[0]
        assert "no frames" in output_problems(np.zeros((0, DIM), np.float32), SR, m, cfg)[0]

    def test_clips_the_encoder_fails_on_are_recorded_not_dropped(self, tmp_path, models):
        clips = make_clips(12, frame_aligned=True)
        # the longest clip, and not frame-aligned: its padded batch cannot be reshaped into frames
        longest = max(len(c.audio) for c in clips)
        bad = Clip(clips[5].key, np.zeros(longest + 7, np.float32), clips[5].targets)
        clips[5] = bad
        rt = SessionRuntime(models["strict"])
        store = FeatureStore.open(tmp_path, make_key())
        cfg = ExtractionConfig(batch_clips=4, sort_buffer=8, shard_bytes=4096, max_failed_fraction=0.1)
        report = extract(rt, clips, store, make_manifest(), cfg)
        assert (report.clips, report.failed) == (11, 1)
        assert rt.calls > 12  # the failing call was retried clip by clip
        f = store.failures[bad.key]
        assert "Reshape" in f.reason and f.targets == bad.targets
        ds = store.dataset(prompt="p")
        assert len(ds) == 11 and bad.key in ds.failed
        # the default policy tolerates no more than 1%: 1 of 12 fails the submission, with the reason
        with pytest.raises(SandboxError, match="failed on 1 of 12 clips") as e:
            extract(SessionRuntime(models["strict"]), clips, FeatureStore.open(tmp_path, make_key(split="b")),
                    make_manifest(), SMALL)
        assert bad.key in e.value.reasons[0]

    def test_an_encoder_that_fails_every_clip_gives_up_early(self, tmp_path, models):
        clips = [Clip(c.key, c.audio[:-1], c.targets) for c in make_clips(40, frame_aligned=True)]
        rt = SessionRuntime(models["strict"])
        with pytest.raises(SandboxError, match="8 clips in a row"):
            extract(rt, clips, FeatureStore.open(tmp_path, make_key()), make_manifest(), SMALL)
        assert rt.calls < 40


# ---- spot re-extraction ----------------------------------------------------------------------
class TestSpotCheck:
    def test_a_deterministic_encoder_passes(self, tmp_path, models):
        clips, manifest = make_clips(16), make_manifest()
        rt = SessionRuntime(models["plain"])
        store = FeatureStore.open(tmp_path, make_key())
        extract(rt, clips, store, manifest, SMALL)
        before = rt.calls
        report = spot_check(rt, {c.key: c for c in clips}, store, manifest, fraction=0.25, seed=3)
        assert len(report.checked) == 4 and report.encoder_calls == rt.calls - before == 4
        assert report.max_abs_diff < 1e-2
        assert list(report.checked) == sample_keys(store, fraction=0.25, seed=3)  # seeded
        assert sample_keys(store, n=4, seed=4) != sample_keys(store, n=4, seed=3)
        # a caller that sampled itself passes only those clips, and all of them are checked
        wanted = sample_keys(store, n=3, seed=9)
        again = spot_check(rt, {c.key: c for c in clips if c.key in wanted}, store, manifest)
        assert list(again.checked) == wanted and again.encoder_calls == 3

    def test_an_encoder_that_changes_when_measured_fails(self, tmp_path, models):
        clips, manifest = make_clips(8), make_manifest()
        store = FeatureStore.open(tmp_path, make_key())
        extract(SessionRuntime(models["random"]), clips, store, manifest, SMALL)
        with pytest.raises(SandboxError, match=r"spot re-extraction of clip shard-000\.tar\.gz/\d+ differs.*max \|diff\|"):
            spot_check(SessionRuntime(models["random"]), {c.key: c for c in clips}, store, manifest, n=2, seed=0)

    def test_a_swapped_encoder_fails(self, tmp_path, models):
        clips, manifest = make_clips(6), make_manifest()
        store = FeatureStore.open(tmp_path, make_key())
        extract(SessionRuntime(models["plain"]), clips, store, manifest, SMALL)
        with pytest.raises(SandboxError, match="differs"):
            spot_check(SessionRuntime(models["random"]), {c.key: c for c in clips}, store, manifest, n=6)


# ---- through the sandbox's ONNX runtime ------------------------------------------------------
class TestWithOnnxRuntime:
    """The same flow through `open_runtime` (the organizer's ONNX runtime) instead of the test session."""

    @pytest.fixture
    def submission(self, tmp_path, models):
        root = tmp_path / "submission"
        root.mkdir()
        (root / "model.onnx").write_bytes(models["plain"].read_bytes())
        return root

    def test_extract_reuse_and_spot_check(self, tmp_path, submission):
        from evaluator.sandbox import Limits, open_runtime

        clips, manifest = make_clips(10), make_manifest()
        with open_runtime(submission, manifest, Limits(cpus=1)) as rt:
            store = FeatureStore.open(tmp_path / "store", make_key())
            report = extract(rt, clips, store, manifest, SMALL)
            assert report.encoder_calls == rt.calls == 10 and report.clips == 10
            check = spot_check(rt, {c.key: c for c in clips}, store, manifest, n=3, seed=1)
            assert check.encoder_calls == 3 and check.max_abs_diff < 1e-2
        with open_runtime(submission, manifest, Limits(cpus=1)) as rt2:
            again = extract(rt2, clips, FeatureStore.open(tmp_path / "store", make_key()), manifest, SMALL)
            assert again.reused and rt2.calls == 0


# ---- the command ------------------------------------------------------------------------------
class TestExtractCommand:
    """``xares-eval extract`` in process on a packed submission and generated webdataset shards."""

    @pytest.fixture
    def submission_tar(self, tmp_path, models):
        from evaluator.submission.archive import pack

        stage = tmp_path / "stage"
        stage.mkdir()
        (stage / "model.onnx").write_bytes(models["plain"].read_bytes())
        return pack(stage, make_manifest(max_seconds=2.0), tmp_path / "submission.tar") and tmp_path / "submission.tar"

    @pytest.fixture
    def shards(self, tmp_path):
        import io
        import json

        import soundfile as sf

        from evaluator.data.shards import write_shard

        clips = make_clips(9, seconds=(0.4, 3.0))
        for s in range(3):
            members = []
            for c in clips[s * 3 : (s + 1) * 3]:
                name = c.key.split("/")[-1]
                wav = io.BytesIO()
                sf.write(wav, c.audio, SR, format="WAV", subtype="FLOAT")
                members += [(f"{name}.wav", wav.getvalue()), (f"{name}.json", json.dumps({"label": c.targets[0]}).encode())]
            members += [("broken.wav", b"not audio"), ("broken.json", b'{"label": "x"}')]  # skipped, reported
            write_shard(tmp_path / "data" / f"part_{s:06d}.tar.gz", members)
        return tmp_path / "data"

    def run(self, *args):
        from click.testing import CliRunner

        from evaluator.cli import eval_cli

        return CliRunner().invoke(eval_cli, ["extract", *map(str, args)])

    def test_extract_then_reuse(self, tmp_path, submission_tar, shards):
        out = tmp_path / "features"
        first = self.run(submission_tar, "--data", f"{shards}/part_*.tar.gz", "--out", out, "--task", "tiny",
                         "--spot-check", "0.5")
        assert first.exit_code == 0, first.output
        assert "9 stored, 0 failed" in first.output and "encoder calls: " in first.output
        assert "audio-seconds per second" in first.output and "3 unreadable audio" in first.output
        assert "long clips in windows" in first.output  # clips up to 3 s, windows of 2 s
        assert "spot check: 5 clips re-extracted" in first.output
        (store,) = FeatureStore.scan(out)
        assert store.complete and store.key.task == "tiny" and len(store.key.data_digests) == 3
        ds = store.dataset(prompt="p")
        assert len(ds) == 9 and ds.targets(0) == ("label0",) and ds.key(0) == "part_000000.tar.gz/00000"
        second = self.run(submission_tar, "--data", f"{shards}/part_*.tar.gz", "--out", out, "--task", "tiny")
        assert second.exit_code == 0, second.output
        assert "encoder calls: 0" in second.output and "Reused" in second.output
        third = self.run(submission_tar, "--data", f"{shards}/part_*.tar.gz", "--out", out, "--task", "tiny",
                         "--dtype", "float32")
        assert third.exit_code == 0 and "encoder calls: 0" not in third.output
        assert len(FeatureStore.scan(out)) == 2

    def test_bad_inputs_are_one_line_errors(self, tmp_path, submission_tar, shards):
        missing = self.run(submission_tar, "--data", tmp_path / "nope.tar.gz", "--out", tmp_path / "f")
        assert missing.exit_code == 1 and missing.output.startswith("Checking") and "error:" in missing.output
        assert "Traceback" not in missing.output
        junk = tmp_path / "junk.tar"
        junk.write_bytes(b"this is not a tar")
        bad = self.run(junk, "--data", f"{shards}/part_*.tar.gz", "--out", tmp_path / "f")
        assert bad.exit_code == 1 and "not a readable tar" in bad.output

    def test_an_encoder_returning_nan_fails_the_command_with_the_clip(self, tmp_path, models, shards):
        from evaluator.submission.archive import pack

        stage = tmp_path / "nan-stage"
        stage.mkdir()
        (stage / "model.onnx").write_bytes(models["nan"].read_bytes())
        pack(stage, make_manifest(), tmp_path / "nan.tar")
        result = self.run(tmp_path / "nan.tar", "--data", f"{shards}/part_*.tar.gz", "--out", tmp_path / "f")
        assert result.exit_code == 1 and "Traceback" not in result.output
        assert "error: the encoder's output for clip part_00000" in result.output and "NaN" in result.output
        (store,) = FeatureStore.scan(tmp_path / "f")
        assert not store.complete and not store.entries  # nothing half-done is taken for features

    @pytest.mark.slow
    def test_the_baseline_template_end_to_end(self, tmp_path, shards):
        """The real baseline (log-mel, exported from submission_template/onnx by xares-submit build)."""
        import io
        import json

        import soundfile as sf

        from evaluator.data.shards import write_shard
        from evaluator.resources import template_dir
        from evaluator.submission import BuildOptions, build

        tar = build(template_dir() / "onnx", tmp_path / "baseline.tar", BuildOptions(team="tests")).output
        long = io.BytesIO()  # 70 s: encoded as three windows of 23.3 s (max_audio_seconds = 30)
        sf.write(long, 0.1 * np.random.default_rng(0).standard_normal(70 * SR).astype(np.float32), SR,
                 format="WAV", subtype="FLOAT")
        write_shard(shards / "long.tar.gz", [("big.wav", long.getvalue()), ("big.json", json.dumps({"label": "x"}).encode())])
        out = tmp_path / "features"
        first = self.run(tar, "--data", f"{shards}/*.tar.gz", "--out", out, "--spot-check", "0.2")
        assert first.exit_code == 0, first.output
        assert "10 stored, 0 failed" in first.output and "1 long clips in windows" in first.output
        (store,) = FeatureStore.scan(out)
        big = store.entries["long.tar.gz/big"]
        assert store.dim == 80 and abs(big.frames - 70 * 50) <= 3
        second = self.run(tar, "--data", f"{shards}/*.tar.gz", "--out", out)
        assert second.exit_code == 0 and "encoder calls: 0" in second.output
