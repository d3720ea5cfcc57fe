"""Hostile participant bytes (issue 10): every parser is bounded before it allocates or recurses, the
answer is one line and exit 1 (never 3 or 70, never a traceback), and the reasons stay few."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from evaluator.cli import submit_cli
from evaluator.errors import SandboxError, SubmissionError
from evaluator.sandbox.extract_protocol import RESPONSE_NAME, read_response
from evaluator.sandbox.onnx_checks import check_model
from evaluator.submission.manifest import Manifest

MANIFEST = {
    "schema_version": 1, "name": "tiny", "team": "tests", "kind": "onnx", "sample_rate": 16000,
    "output_dim": 8, "frame_hop_ms": 20, "max_audio_seconds": 30, "output_dtype": "float32",
    "onnx": {"model": "model.onnx", "audio_input": "audio", "features_output": "features"}, "files": [],
}


def tar_of(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def submission(tmp_path: Path, manifest_text: str | bytes, *, sums: str | None = None,
               payload: dict[str, bytes] | None = None) -> Path:
    files = {"manifest.json": manifest_text.encode() if isinstance(manifest_text, str) else manifest_text,
             **(payload or {})}
    if sums is None:
        import hashlib

        sums = "".join(f"{hashlib.sha256(v).hexdigest()}  {k}\n" for k, v in files.items())
    files["SHA256SUMS"] = sums.encode()
    return tar_of(tmp_path / "submission.tar", files)


def validate_cli(tar: Path):
    result = CliRunner().invoke(submit_cli, ["validate", str(tar)])
    lines = [line for line in result.output.splitlines() if line.strip()]
    return result.exit_code, lines


def one_line_exit_1(tar: Path, words: str) -> list[str]:
    code, lines = validate_cli(tar)
    assert code == 1, lines
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and words in errors[0] + " ".join(lines), lines
    assert not any("Traceback" in line or "internal error" in line for line in lines)
    return lines


class TestManifestBytes:
    def test_deeply_nested_manifest(self, tmp_path):
        deep = '{"name": ' + "[" * 50_000 + "]" * 50_000 + "}"
        one_line_exit_1(submission(tmp_path, deep), "nested more than 64 levels deep")

    def test_nan_frame_hop(self, tmp_path):
        text = json.dumps(MANIFEST).replace('"frame_hop_ms": 20', '"frame_hop_ms": NaN')
        one_line_exit_1(submission(tmp_path, text), "NaN is not a JSON number")

    def test_float_output_dim(self, tmp_path):
        text = json.dumps({**MANIFEST, "output_dim": 80.0})
        one_line_exit_1(submission(tmp_path, text), "output_dim: 80.0 is not an integer")

    def test_python_side_nan_and_float_ints_are_refused_too(self):
        with pytest.raises(SubmissionError) as e:
            Manifest.from_dict({**MANIFEST, "output_dim": 8.0, "resources": {"memory_mb": 128.0}})
        assert {"output_dim: 8.0 is not an integer", "resources/memory_mb: 128.0 is not an integer"} <= set(
            e.value.reasons)


class TestChecksums:
    def test_a_second_line_cannot_hide_a_wrong_first_one(self, tmp_path):
        import hashlib

        text = json.dumps(MANIFEST)
        right = hashlib.sha256(text.encode()).hexdigest()
        sums = f"{'0' * 64}  manifest.json\n{right}  manifest.json\n"
        one_line_exit_1(submission(tmp_path, text, sums=sums), "lists manifest.json twice")

    def test_thousands_of_missing_files_print_a_capped_list(self, tmp_path):
        files = [{"path": f"w/{i:05d}.bin", "sha256": "0" * 64, "size": 1} for i in range(5000)]
        lines = one_line_exit_1(submission(tmp_path, json.dumps({**MANIFEST, "files": files})), "missing")
        assert len(lines) < 40 and any(line.endswith("more") for line in lines)


class TestEncoderOutputBytes:
    def test_a_tiny_npy_declaring_a_huge_shape_is_refused_unread(self, tmp_path):
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False,
                                                      "shape": (10**12, 8)})  # 32 TB declared, 64 bytes sent
        (tmp_path / "000000.npy").write_bytes(header.getvalue() + b"\0" * 64)
        (tmp_path / RESPONSE_NAME).write_text(json.dumps({"schema_version": 1, "items": [
            {"id": "a", "status": "ok", "features": "000000.npy", "shape": [50, 8], "dtype": "float32"}]}))
        with pytest.raises(SandboxError) as e:
            read_response(tmp_path, [RESPONSE_NAME, "000000.npy"],
                          items=[{"id": "a", "path": "a.wav", "num_samples": 16000}],
                          manifest=Manifest.from_dict(MANIFEST))
        # the declared (and plausible) 50 frames x 8 x 4 bytes bound what is read
        assert "32000000000000 bytes, over the 1600-byte limit" in " ".join(e.value.reasons)

    def test_deeply_nested_response(self, tmp_path):
        (tmp_path / RESPONSE_NAME).write_text("[" * 100_000 + "]" * 100_000)
        with pytest.raises(SandboxError, match="nested more than"):
            read_response(tmp_path, [RESPONSE_NAME], items=[], manifest=Manifest.from_dict(MANIFEST))


def _model_with(tmp_path: Path, *, function: bool = False, sparse: bool = False) -> Path:
    """A valid-looking model that points a tensor's external data outside the folder, where the old
    check did not look: inside a model-local function, or in a sparse initializer."""
    outside = helper.make_tensor("W", TensorProto.FLOAT, [1], [0.0])
    outside.data_location = TensorProto.EXTERNAL
    del outside.float_data[:]
    outside.external_data.add(key="location", value="../../../etc/passwd")
    if function:
        body = [helper.make_node("Constant", [], ["c"], value=outside), helper.make_node("Add", ["x", "c"], ["y"])]
        fn = helper.make_function("local", "AddW", ["x"], ["y"], body, [helper.make_opsetid("", 18)])
        graph = helper.make_graph([helper.make_node("AddW", ["audio"], ["features"], domain="local")], "g",
                                  [helper.make_tensor_value_info("audio", TensorProto.FLOAT, ["B", "S"])],
                                  [helper.make_tensor_value_info("features", TensorProto.FLOAT, None)])
        model = helper.make_model(graph, functions=[fn], opset_imports=[helper.make_opsetid("", 18),
                                                                        helper.make_opsetid("local", 1)])
    else:
        indices = helper.make_tensor("W_idx", TensorProto.INT64, [1], [0])
        sparse_w = helper.make_sparse_tensor(outside, indices, [4])
        graph = helper.make_graph([helper.make_node("Identity", ["audio"], ["features"])], "g",
                                  [helper.make_tensor_value_info("audio", TensorProto.FLOAT, ["B", "S"])],
                                  [helper.make_tensor_value_info("features", TensorProto.FLOAT, None)],
                                  sparse_initializer=[sparse_w])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    path = tmp_path / "model.onnx"
    onnx.save_model(model, str(path))
    return path


@pytest.mark.parametrize("where", ["function", "sparse"])
def test_static_onnx_check_looks_inside_functions_and_sparse_initializers(tmp_path, where):
    path = _model_with(tmp_path, **{where: True})
    with pytest.raises(SubmissionError) as e:
        check_model(tmp_path.resolve(), path)
    assert "external data" in str(e.value) and any("climbs out" in r for r in e.value.reasons)


def _field(number: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field."""
    def varint(n: int) -> bytes:
        out = b""
        while True:
            out += bytes([(n & 0x7F) | (0x80 if n > 0x7F else 0)])
            n >>= 7
            if not n:
                return out
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def test_a_graph_nested_past_any_limit_is_refused_not_crashed(tmp_path):
    # If inside If inside If ... 5000 levels, written as raw protobuf (the onnx helpers refuse to build it)
    graph = b""
    for _ in range(5000):
        attribute = _field(1, b"then_branch") + _field(6, graph) + b"\xa0\x01\x05"  # name, g, type=GRAPH
        node = _field(4, b"If") + _field(5, attribute)
        graph = _field(1, node)
    path = tmp_path / "model.onnx"
    path.write_bytes(b"\x08\x08" + _field(7, graph))  # ir_version 8, graph
    with pytest.raises(SubmissionError, match="not a readable ONNX model"):
        check_model(tmp_path.resolve(), path)
