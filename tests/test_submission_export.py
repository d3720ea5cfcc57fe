"""``export_encoder`` and the torch build: external data, float16 weights, failures that say why, and a
``source/`` that holds every file the export used. Real torch exporters and onnxruntime throughout."""

from __future__ import annotations

import importlib.util
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from evaluator.errors import SubmissionError
from evaluator.sandbox.onnx_checks import check_model, external_data_files
from evaluator.submission import BuildOptions, ProbeConfig, build, validate
from evaluator.submission import export as export_mod
from evaluator.submission.export import (
    EXPORT_RTOL,
    WAYS_OUT,
    check_batch,
    export_encoder,
    load_encoder,
    root_cause,
    run_onnx,
)
from evaluator.submission.provenance import SourceCaps, copy_sources, record_reads
from evaluator.submission.validate import ValidateOptions

ENCODERS = Path(__file__).parent / "resources" / "encoders"
FAST = BuildOptions(probe=ProbeConfig(max_seconds=3.0))
MiB = 1 << 20

# Two dense layers on 20 ms frames: 0.3 M float32 weights, so the weights dominate the file.
DENSE_ENCODER = """
import torch

class DenseEncoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.output_dim = 256
        self.net = torch.nn.Sequential(torch.nn.Linear(320, 512), torch.nn.GELU(), torch.nn.Linear(512, 256))

    def forward(self, audio, audio_attention_mask):
        audio = audio * audio_attention_mask.to(audio.dtype)
        frames = torch.nn.functional.pad(audio, (0, 319))
        n = (audio.shape[1] + 319) // 320
        x = frames[:, : n * 320].reshape(audio.shape[0], n, 320)
        lengths = torch.div(audio_attention_mask.sum(-1) + 319, 320, rounding_mode="floor")
        return self.net(x), (torch.arange(n)[None, :] < lengths[:, None]).long()
"""

# Neither exporter has torch.linalg.svdvals: the failure both must explain.
SVD_ENCODER = """
import torch

class SvdEncoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.output_dim = 8

    def forward(self, audio, audio_attention_mask):
        frames = audio[:, : audio.shape[1] // 320 * 320].reshape(audio.shape[0], -1, 40, 8)
        return torch.linalg.svdvals(frames), None
"""

# A torch.jit.script'ed part: exported by torch.jit.script + the TorchScript exporter (FRAMES), or not (SVD).
SCRIPTED_ENCODER = """
import torch

class Frames(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(320, 8)

    def forward(self, audio, mask):
        n = audio.shape[1] // 320
        x = (audio * mask.to(audio.dtype))[:, : n * 320].reshape(audio.shape[0], n, 320)
        return {body}


class ScriptedEncoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.frames = torch.jit.script(Frames())
        self.output_dim = 8

    def forward(self, audio, audio_attention_mask):
        return self.frames(audio, audio_attention_mask), None
"""

# silero-vad's real TorchScript file (trained weights), called on 32 ms chunks.
SILERO_ENCODER = """
import os
import torch
import silero_vad

JIT = os.path.join(os.path.dirname(silero_vad.__file__), "data", "silero_vad.jit")


class SileroEncoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.vad = torch.jit.load(JIT)
        self.output_dim = 1

    def forward(self, audio, audio_attention_mask):
        self.vad.reset_states()
        chunks = audio[:, : audio.shape[1] // 512 * 512].reshape(audio.shape[0], -1, 512)
        probs = [self.vad(chunks[:, i], 16000) for i in range(chunks.shape[1])]
        return torch.stack(probs, 1).reshape(audio.shape[0], -1, 1), None
"""


def write_encoder(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "encoder.py").write_text(text)
    return folder / "encoder.py"


def conv_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "conv"
    shutil.copytree(ENCODERS / "conv", folder)
    shutil.copy(ENCODERS / "conv_base.py", folder)
    return folder


def refusal(encoder_py: Path, out: Path) -> list[str]:
    with pytest.raises(SubmissionError) as e:
        export_encoder(encoder_py, out)
    return [str(e.value), *e.value.reasons]


class TestWeights:
    def test_small_model_stays_one_file(self, tmp_path):
        out = tmp_path / "out" / "model.onnx"
        out.parent.mkdir()
        result = export_encoder(conv_folder(tmp_path) / "encoder.py", out)
        assert result.external_data == () and [p.name for p in out.parent.iterdir()] == ["model.onnx"]
        assert result.weights_dtype == "float32" and result.max_rel_diff < EXPORT_RTOL

    @pytest.mark.slow
    def test_external_data_package_builds_and_validates(self, tmp_path, monkeypatch):
        monkeypatch.setattr(export_mod, "EXTERNAL_DATA_BYTES", 1024)  # as if the weights passed 1.5 GiB
        out = tmp_path / "conv.tar"
        result = build(conv_folder(tmp_path), out, FAST)
        assert result.probe.ok
        assert any("external data beside model.onnx: model.onnx.data" in n for n in result.notes)
        root = tmp_path / "unpacked"
        with tarfile.open(out) as tar:
            assert {"model.onnx", "model.onnx.data"} <= set(tar.getnames())
            report = json.load(tar.extractfile("build_report.json"))
            tar.extractall(root, filter="data")
        assert report["external_data"] == ["model.onnx.data"] and report["onnx_vs_torch"] < EXPORT_RTOL
        root = root.resolve()
        check_model(root, root / "model.onnx")  # the organizer's rule: relative, inside, no link
        assert external_data_files(root / "model.onnx") == ["model.onnx.data"]
        assert validate(out, ValidateOptions(probe=FAST.probe)).probe.ok

    def test_float16_weights_halve_the_file_and_match_torch(self, tmp_path):
        encoder_py = write_encoder(tmp_path / "dense", DENSE_ENCODER)
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        full = export_encoder(encoder_py, tmp_path / "a" / "model.onnx")
        half = export_encoder(encoder_py, tmp_path / "b" / "model.onnx", weights_dtype="float16")
        size32, size16 = ((tmp_path / d / "model.onnx").stat().st_size for d in "ab")
        assert 0.45 < size16 / size32 < 0.55 and half.weights_bytes < 0.51 * full.weights_bytes
        assert half.weights_dtype == "float16" and half.max_rel_diff < EXPORT_RTOL  # vs torch, same rounding
        assert 0 < half.rounding_rel_diff < 1e-2
        graph = onnx.load(str(tmp_path / "b" / "model.onnx")).graph
        big = [i for i in graph.initializer if np.prod(i.dims) >= export_mod.FP16_MIN_ELEMENTS]
        assert len(big) >= 2 and all(i.data_type == onnx.TensorProto.FLOAT16 for i in big)
        casts = {n.input[0] for n in graph.node if n.op_type == "Cast"}
        assert all(i.name in casts for i in big)  # each read through a Cast to float32
        # against the participant's float32 weights: within float16's rounding
        audio, mask = check_batch((2.0, 1.3))
        with torch.no_grad():
            torch_feats = load_encoder(encoder_py)(torch.from_numpy(audio), torch.from_numpy(mask))[0].numpy()
        onnx_feats, _ = run_onnx(tmp_path / "b" / "model.onnx", half.onnx, audio, mask)
        assert np.abs(onnx_feats - torch_feats).max() / np.abs(torch_feats).max() < 1e-2

    @pytest.mark.slow
    def test_manifest_asks_for_float16(self, tmp_path):
        folder = tmp_path / "dense"
        write_encoder(folder, DENSE_ENCODER)
        (folder / "manifest.json").write_text(json.dumps({"schema_version": 2, "weights_dtype": "float16"}))
        out = tmp_path / "dense.tar"
        result = build(folder, out, FAST)
        with tarfile.open(out) as tar:
            report = json.load(tar.extractfile("build_report.json"))
        assert result.manifest.weights_dtype == "float16" and report["weights_dtype"] == "float16"
        assert report["float16_rounding"] < 1e-2 and report["onnx_vs_torch"] < EXPORT_RTOL

    def test_unknown_weights_dtype_refused(self, tmp_path):
        with pytest.raises(SubmissionError, match="weights_dtype must be one of"):
            export_encoder(conv_folder(tmp_path) / "encoder.py", tmp_path / "m.onnx", weights_dtype="int8")


class TestExportFailures:
    def test_each_exporter_gives_its_root_cause_then_the_ways_out(self, tmp_path):
        lines = refusal(write_encoder(tmp_path / "svd", SVD_ENCODER), tmp_path / "m.onnx")
        assert lines[0] == "torch.onnx could not export SvdEncoder"
        dynamo, torchscript, ways = lines[1:]
        assert dynamo.startswith("dynamo exporter: ") and "aten._linalg_svd" in dynamo
        assert torchscript.startswith("TorchScript exporter: ") and "aten::linalg_svdvals" in torchscript
        assert not any("Failed to export the model" in line or "step 1/3" in line for line in lines)
        assert ways == WAYS_OUT and "--source onnx" in ways and "--kind container" in ways

    @pytest.mark.parametrize("kind", ["silero", "scripted"])
    def test_torchscript_modules_are_named(self, tmp_path, kind):
        if kind == "silero" and importlib.util.find_spec("silero_vad") is None:
            pytest.skip("silero-vad is not installed (pip install silero-vad --no-deps)")
        text = (
            SILERO_ENCODER
            if kind == "silero"
            else SCRIPTED_ENCODER.format(body="torch.linalg.svdvals(x.reshape(x.shape[0], n, 40, 8))")
        )
        lines = refusal(write_encoder(tmp_path / kind, text), tmp_path / "m.onnx")
        assert lines[1].startswith(
            "TorchScript modules (torch.jit.load/script) cannot be exported by torch.export: "
        )
        assert ("vad (VADRNNJITMerge)" if kind == "silero" else "frames (Frames)") in lines[1]
        assert lines[2].startswith("torch.jit.script + TorchScript exporter: ")
        assert "[Caused by" not in lines[2] and len(lines[2]) <= 340
        assert lines[-1] == WAYS_OUT

    def test_scripted_module_that_exports_is_accepted(self, tmp_path):
        encoder_py = write_encoder(tmp_path / "ok", SCRIPTED_ENCODER.format(body="self.proj(x)"))
        result = export_encoder(encoder_py, tmp_path / "m.onnx")
        assert result.exporter == "torchscript-script" and result.max_rel_diff < EXPORT_RTOL

    def test_root_cause_skips_the_preamble(self):
        try:
            try:
                raise ValueError("Could not guard on data-dependent expression u0 > 1\nmore detail")
            except ValueError as inner:
                raise RuntimeError(
                    "Failed to export the model with torch.export. \x1b[96mThis is step 1/3\x1b[0m ..."
                ) from inner
        except RuntimeError as e:
            assert root_cause(e) == "ValueError: Could not guard on data-dependent expression u0 > 1"
        summary = RuntimeError(
            "Failed to convert the exported program to an ONNX model. This is step 3/3\n\n## Exception summary\n\n"
            "<class 'torch.onnx._internal.exporter._errors.DispatchError'>: No ONNX function found for x\n"
        )
        assert root_cause(summary) == "DispatchError: No ONNX function found for x"


class TestSourceFiles:
    @pytest.mark.slow
    def test_source_holds_what_the_export_used(self, tmp_path):
        folder = conv_folder(tmp_path)
        (folder / "helpers").mkdir()
        (folder / "helpers" / "__init__.py").write_text("from helpers.scale import SCALE\n")
        (folder / "helpers" / "scale.py").write_text("SCALE = 1.0\n")
        (folder / "config.json").write_text('{"dim": 32}')
        with open(folder / "big.bin", "wb") as f:  # sparse: 65 MiB on paper, over the 64 MiB cap
            f.truncate(65 * MiB)
        (folder / "notes.txt").write_text("not used")
        outside = tmp_path / "outside.json"
        outside.write_text("{}")
        (folder / "link.json").symlink_to(outside)
        (folder / "encoder.py").write_text(
            "import json\nfrom pathlib import Path\n\nfrom conv_base import ConvFrontEnd\nfrom helpers import SCALE\n\n"
            "HERE = Path(__file__).parent\n\n\nclass ConvEncoder(ConvFrontEnd):\n    def __init__(self):\n"
            "        super().__init__()\n        assert json.loads((HERE / 'config.json').read_text())['dim'] == 32\n"
            "        json.loads((HERE / 'link.json').read_text())\n"
            "        with open(HERE / 'big.bin', 'rb') as f:\n            f.read(4)\n"
        )
        out = tmp_path / "conv.tar"
        result = build(folder, out, FAST)
        with tarfile.open(out) as tar:
            sources = {n for n in tar.getnames() if n.startswith("source/")}
            report = json.load(tar.extractfile("build_report.json"))["source_files"]
        assert sources == {
            "source/encoder.py",
            "source/conv_base.py",
            "source/helpers/__init__.py",
            "source/helpers/scale.py",
            "source/config.json",
        }
        assert report["left_out"] == [
            {"path": "big.bin", "bytes": 65 * MiB, "why": "over the 64 MiB cap per file"}
        ]
        assert report["cap_bytes"] == 64 * MiB and any("leaves out big.bin" in n for n in result.notes)

    def test_same_named_sibling_of_another_folder_is_not_reused(self, tmp_path):
        for dim in (3, 5):
            folder = tmp_path / f"enc{dim}"
            write_encoder(
                folder, "from frontend import DIM, Base\n\n\nclass SiblingEncoder(Base):\n    pass\n"
            )
            (folder / "frontend.py").write_text(
                (ENCODERS / "conv_base.py")
                .read_text()
                .replace("self.output_dim = 32", f"self.output_dim = {dim}")
                .replace("torch.nn.Conv1d(1, 32,", f"torch.nn.Conv1d(1, {dim},")
                + f"\nDIM = {dim}\nBase = ConvFrontEnd\n"
            )
            result = export_encoder(folder / "encoder.py", tmp_path / f"m{dim}.onnx")
            assert result.output_dim == dim and result.source_files == ("encoder.py", "frontend.py")

    def test_record_reads_keeps_reads_inside_the_folder(self, tmp_path):
        folder = tmp_path / "f"
        folder.mkdir()
        (folder / "a.json").write_text("{}")
        (tmp_path / "outside.txt").write_text("x")
        with record_reads(folder) as reads:
            (folder / "a.json").read_text()
            (tmp_path / "outside.txt").read_text()
            (folder / "written.txt").write_text("made, not used")
        (folder / "late.txt").write_text("y")
        (folder / "late.txt").read_text()  # after the block: not recorded
        assert reads.files() == ["a.json"]

    def test_copy_sources_caps(self, tmp_path):
        folder = tmp_path / "f"
        folder.mkdir()
        for name, size in [("a.py", 10), ("b.bin", 300), ("c.bin", 600)]:
            (folder / name).write_bytes(b"x" * size)
        copied = copy_sources(
            folder, ["c.bin", "a.py", "b.bin", "../x"], tmp_path / "src", SourceCaps(500, 400)
        )
        assert copied.included == ("a.py", "b.bin")
        assert [(x["path"], x["why"]) for x in copied.left_out] == [
            ("../x", "not a regular file inside the folder"),
            ("c.bin", f"over the {500 / MiB:g} MiB cap per file"),
        ]
