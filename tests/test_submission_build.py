"""``build`` on real folders: torch *Encoders exported by torch.onnx, ONNX folders, broken encoders."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import pytest
from resources.encoders.onnx_models import make_onnx

from evaluator.errors import SubmissionError
from evaluator.submission import BuildOptions, ProbeConfig, build, validate
from evaluator.submission.validate import ValidateOptions

ENCODERS = Path(__file__).parent / "resources" / "encoders"
FAST = BuildOptions(probe=ProbeConfig(max_seconds=3.0))


def copy_encoder(name: str, tmp_path: Path) -> Path:
    folder = tmp_path / name
    shutil.copytree(ENCODERS / name, folder)
    shutil.copy(ENCODERS / "conv_base.py", folder)  # encoder.py imports its sibling, as participants may
    return folder


def refused(folder: Path, out: Path, options=FAST) -> str:
    with pytest.raises(SubmissionError) as e:
        build(folder, out, options)
    assert not out.exists()
    return " | ".join([str(e.value), *e.value.reasons])


class TestTorchFolders:
    def test_conv_encoder_builds_and_validates(self, tmp_path):
        folder = copy_encoder("conv", tmp_path)
        out = tmp_path / "conv.tar"
        result = build(folder, out, BuildOptions(team="lab", probe=FAST.probe))
        m = result.manifest
        assert (m.name, m.team, m.kind, m.output_dim, m.frame_hop_ms) == ("conv", "lab", "onnx", 32, 20.0)
        assert m.onnx.mask_output == "feature_attention_mask" and m.onnx.mask_input == "audio_attention_mask"
        assert result.probe.ok and any("measured" in n for n in result.notes)
        with tarfile.open(out) as tar:
            names = tar.getnames()
            report = json.load(tar.extractfile("build_report.json"))
        assert {"manifest.json", "SHA256SUMS", "build_report.json", "model.onnx", "source/encoder.py",
                "source/conv_base.py"} == set(names)  # the sibling module encoder.py imports travels too
        assert report["probe"]["ok"] and report["encoder_class"] == "ConvEncoder"
        assert report["onnx_vs_torch"] < 1e-3
        checked = validate(out, ValidateOptions(probe=FAST.probe))
        assert checked.manifest == m and checked.probe.ok

    @pytest.mark.parametrize(
        "name, words",
        [
            ("wrong_dim", "manifest output_dim is 32"),
            ("nan", "finite: "),
            ("wrong_rank", "the contract is [B, T, D]"),
            ("raises", "forward raised RuntimeError: checkpoint not loaded"),
            ("raises_on_length", "runs: "),
            ("nondeterministic", "deterministic: "),
            ("wrong_hop", "frame_rate: frame counts do not follow frame_hop_ms=40"),
        ],
    )
    def test_broken_encoder_refused(self, tmp_path, name, words):
        text = refused(copy_encoder(name, tmp_path), tmp_path / "out.tar")
        assert words in text

    def test_padding_sensitive_torch_encoder_builds_with_its_cause_named(self, tmp_path):
        result = build(copy_encoder("ignores_mask", tmp_path), tmp_path / "out.tar", FAST)
        assert result.manifest.measured["batching"] == "equal_length"
        assert "normalisation over time" in result.manifest.measured["padding_cause"]

    def test_reference_dummy_encoder_refused_as_non_deterministic(self, tmp_path):
        text = refused(copy_encoder("dummy", tmp_path), tmp_path / "out.tar")
        assert "deterministic: two forward passes of DummyEncoder" in text

    def test_two_encoder_classes_refused(self, tmp_path):
        folder = copy_encoder("conv", tmp_path)
        with open(folder / "encoder.py", "a") as f:
            f.write("\n\nclass OtherEncoder(ConvEncoder):\n    pass\n")
        assert "exactly one" in refused(folder, tmp_path / "out.tar")

    def test_import_error_reported(self, tmp_path):
        folder = tmp_path / "broken"
        folder.mkdir()
        (folder / "encoder.py").write_text("import not_a_module_anywhere\n")
        assert "importing encoder.py failed: ModuleNotFoundError" in refused(folder, tmp_path / "out.tar")


class TestOnnxFolders:
    def test_model_and_partial_manifest(self, tmp_path):
        folder = tmp_path / "mine"
        folder.mkdir()
        make_onnx(folder / "model.onnx", dim=12)
        (folder / "manifest.json").write_text(json.dumps({"name": "mine", "team": "t", "license": "MIT"}))
        result = build(folder, tmp_path / "s.tar", FAST)
        m = result.manifest
        assert (m.output_dim, m.frame_hop_ms, m.license) == (12, 20.0, "MIT")
        assert (m.onnx.audio_input, m.onnx.mask_input, m.onnx.mask_output) == (
            "audio",
            "audio_attention_mask",
            "frame_mask",
        )
        assert validate(tmp_path / "s.tar", ValidateOptions(probe=FAST.probe)).probe.ok

    def test_external_data_inside_the_folder_is_packed(self, tmp_path):
        folder = tmp_path / "big"
        folder.mkdir()
        make_onnx(folder / "model.onnx", dim=12, external_data=True)  # weights in model.onnx.data
        (folder / "notes.txt").write_text("not referenced: stays out of the archive")
        (folder / "manifest.json").write_text(json.dumps({"name": "big", "team": "t"}))
        result = build(folder, tmp_path / "s.tar", FAST)
        with tarfile.open(tmp_path / "s.tar") as tar:
            names = set(tar.getnames())
        assert {"model.onnx", "model.onnx.data"} <= names and "notes.txt" not in names
        assert {f.path for f in result.manifest.files} >= {"model.onnx", "model.onnx.data"}
        assert validate(tmp_path / "s.tar", ValidateOptions(probe=FAST.probe)).probe.ok

    def test_external_data_outside_the_folder_refused(self, tmp_path):
        folder = tmp_path / "escape"
        folder.mkdir()
        make_onnx(tmp_path / "model.onnx", external_data=True)
        (tmp_path / "model.onnx").rename(folder / "model.onnx")  # its data stays one level up
        import onnx

        model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
        for t in model.graph.initializer:
            for e in t.external_data:
                if e.key == "location":
                    e.value = "../model.onnx.data"
        onnx.save(model, str(folder / "model.onnx"))
        with pytest.raises(SubmissionError) as e:
            build(folder, tmp_path / "s.tar", FAST)
        assert any("climbs out with '..'" in r for r in e.value.reasons)
        assert not (tmp_path / "s.tar").exists()

    def test_broken_onnx_refused(self, tmp_path):
        folder = tmp_path / "nan"
        folder.mkdir()
        make_onnx(folder / "model.onnx", nan=True)
        assert "finite: " in refused(folder, tmp_path / "s.tar")

    def test_size_cap(self, tmp_path):
        folder = tmp_path / "mine"
        folder.mkdir()
        make_onnx(folder / "model.onnx")
        options = BuildOptions(probe=FAST.probe, max_bytes=2048)
        assert "over the" in refused(folder, tmp_path / "s.tar", options)


class TestFolderKinds:
    def test_empty_folder(self, tmp_path):
        assert "nothing to build" in refused(tmp_path, tmp_path / "s.tar")

    def test_ambiguous_folder(self, tmp_path):
        folder = copy_encoder("conv", tmp_path)
        make_onnx(folder / "model.onnx")
        assert "--source" in refused(folder, tmp_path / "s.tar")

    def test_bad_manifest_json(self, tmp_path):
        folder = copy_encoder("conv", tmp_path)
        (folder / "manifest.json").write_text("[1, 2")
        assert "not valid JSON" in refused(folder, tmp_path / "s.tar")


class TestMeasuredInTheManifest:
    """What the probe measured goes into the manifest's `measured` section and the build report."""

    def onnx_folder(self, tmp_path: Path, manifest: dict | None = None, **model) -> Path:
        folder = tmp_path / "enc"
        folder.mkdir()
        make_onnx(folder / "model.onnx", **model)
        (folder / "manifest.json").write_text(json.dumps({"team": "lab", **(manifest or {})}))
        return folder

    def test_padding_sensitive_encoder_builds_with_its_batching_recorded(self, tmp_path):
        out = tmp_path / "s.tar"
        result = build(self.onnx_folder(tmp_path, ignores_mask=True), out, FAST)
        m = result.manifest
        assert m.schema_version == 2 and m.measured["batching"] == "equal_length"
        assert "normalisation over time" in m.measured["padding_cause"]
        with tarfile.open(out) as tar:
            report = json.load(tar.extractfile("build_report.json"))
            packed = json.load(tar.extractfile("manifest.json"))
        assert packed["measured"] == m.measured and report["measured"]["unbatched_cost"] > 0
        assert validate(out, ValidateOptions(probe=FAST.probe)).probe.batching == "equal_length"

    def test_clip_level_encoder_is_derived_as_fixed_frames(self, tmp_path):
        out = tmp_path / "s.tar"
        result = build(self.onnx_folder(tmp_path, clip_level=True, mask_output=False), out, FAST)
        m = result.manifest
        assert m.fixed_frames and m.frame_hop_ms is None and m.measured["fixed_frames"] == 1
        assert any(n.startswith("frames = fixed") for n in result.notes)
        assert validate(out, ValidateOptions(probe=FAST.probe)).probe.fixed_frames == 1

    def test_fixed_frames_in_a_version_1_manifest_is_refused_with_the_fix(self, tmp_path):
        folder = self.onnx_folder(tmp_path, {"schema_version": 1}, clip_level=True, mask_output=False)
        assert '"schema_version": 2 and "frames": "fixed"' in refused(folder, tmp_path / "s.tar")

    def test_large_outputs_are_measured_not_refused(self, tmp_path):
        result = build(self.onnx_folder(tmp_path, gain=1e6), tmp_path / "s.tar", FAST)
        assert result.manifest.measured["feature_dtype"] == "float32"
        assert result.manifest.measured["feature_peak"] > 65504

    def test_a_version_1_manifest_stays_version_1(self, tmp_path):
        result = build(self.onnx_folder(tmp_path, {"schema_version": 1}), tmp_path / "s.tar", FAST)
        assert result.manifest.schema_version == 1 and result.manifest.measured == {}
        with tarfile.open(tmp_path / "s.tar") as tar:
            assert "measured" not in json.load(tar.extractfile("manifest.json"))

    def test_the_probe_runs_under_the_manifests_memory_not_a_default(self, tmp_path):
        # a large encoder declares what it needs; build must probe it as validate and run will
        folder = self.onnx_folder(tmp_path, {"resources": {"memory_mb": 12288}})
        result = build(folder, tmp_path / "s.tar", FAST)
        assert "rlimits: 12288 MB data" in result.probe.runtime["isolation"]
