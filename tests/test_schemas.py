"""The JSON schemas: well-formed draft 2020-12, versioned, and round-tripping real documents."""

from __future__ import annotations

import copy
import json

import jsonschema
import pytest

from evaluator.errors import SubmissionError
from evaluator.resources import load_schema, schema_errors, schemas_dir
from evaluator.submission.manifest import Manifest

NAMES = ["submission", "extract_request", "extract_response", "results"]

MINIMAL_RESULTS = {
    "schema_version": 1,
    "submission": {"name": "baseline", "sha256": "ab" * 32},
    "machine": "cpu-1",
    "track": "A",
    "tasks": [{"task": "esc-50", "hidden": False, "metric": "Accuracy", "score": 0.5, "n_samples": 400}],
}

ONNX_MANIFEST = {
    "schema_version": 1,
    "name": "logmel-baseline",
    "team": "organizers",
    "kind": "onnx",
    "sample_rate": 16000,
    "output_dim": 64,
    "frame_hop_ms": 20,
    "max_audio_seconds": 30,
    "output_dtype": "float32",
    "onnx": {"model": "model.onnx", "audio_input": "audio", "mask_input": "audio_attention_mask",
             "features_output": "features", "mask_output": "mask"},
    "resources": {"gpu": False, "memory_mb": 2048},
    "license": "Apache-2.0",
    "files": [{"path": "model.onnx", "sha256": "0" * 64, "size": 10}],
}


@pytest.mark.parametrize("name", NAMES)
def test_schema_is_valid_2020_12_with_id_and_version(name):
    schema = load_schema(name)
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    version = {"submission": 2}.get(name, 1)
    assert schema["$id"].endswith(f"/{name}/{version}")
    assert schema["properties"]["schema_version"] in ({"const": 1}, {"enum": list(range(1, version + 1))})


class TestManifestVersions:
    """Version 2 adds frames, weights_dtype and measured; every version 1 manifest stays valid."""

    V2_FIXED = {**{k: v for k, v in ONNX_MANIFEST.items() if k != "frame_hop_ms"}, "schema_version": 2,
                "frames": "fixed", "weights_dtype": "float16",
                "measured": {"fixed_frames": 1500, "feature_peak": 7.1e4, "feature_dtype": "float32",
                             "batching": "equal_length", "padding_cause": "normalisation over time"}}

    def test_version_1_still_valid_and_round_trips_unchanged(self):
        m = Manifest.from_dict(ONNX_MANIFEST)
        assert m.frames == "follows_audio" and m.frames_per_second == 50
        assert m.to_dict() == {**ONNX_MANIFEST, "description": ""}  # defaults filled, no version 2 field

    def test_version_2_fixed_frames_needs_no_hop(self):
        m = Manifest.from_dict(self.V2_FIXED)
        assert m.fixed_frames and m.frame_hop_ms is None and m.frames_per_second is None
        assert m.describe_frames() == "a fixed 1500 frames per clip"
        assert m.to_dict() == {**self.V2_FIXED, "description": ""}

    def test_version_2_following_audio_still_needs_the_hop(self):
        doc = {**self.V2_FIXED, "frames": "follows_audio"}
        with pytest.raises(SubmissionError) as e:
            Manifest.from_dict(doc)
        assert any("frame_hop_ms" in r for r in e.value.reasons)

    @pytest.mark.parametrize("field", ["frames", "weights_dtype", "measured"])
    def test_version_2_fields_are_refused_in_version_1(self, field):
        doc = {**ONNX_MANIFEST, field: self.V2_FIXED[field]}
        with pytest.raises(SubmissionError):
            Manifest.from_dict(doc)


def test_every_schema_file_is_listed():
    assert sorted(p.name.removesuffix(".schema.json") for p in schemas_dir().glob("*.schema.json")) == sorted(NAMES)


class TestResults:
    def test_minimal_document_is_valid(self):
        assert schema_errors(MINIMAL_RESULTS, "results") == []

    @pytest.mark.parametrize("field", ["schema_version", "submission", "machine", "track", "tasks"])
    def test_each_required_field_is_required(self, field):
        doc = copy.deepcopy(MINIMAL_RESULTS)
        del doc[field]
        assert any(field in e for e in schema_errors(doc, "results"))

    @pytest.mark.parametrize("score", [-0.01, 1.01, "0.5"])
    def test_score_outside_unit_interval_refused(self, score):
        doc = copy.deepcopy(MINIMAL_RESULTS)
        doc["tasks"][0]["score"] = score
        assert schema_errors(doc, "results")

    @pytest.mark.parametrize("metric, score, valid", [
        ("FENSE", -0.2, True), ("DATE", -1.0, True), ("FENSE", -1.01, False), ("FENSE", 1.01, False),
        ("iWER", -0.2, False), ("mAP", -0.001, False),
    ])
    def test_only_caption_scores_may_be_negative(self, metric, score, valid):
        doc = copy.deepcopy(MINIMAL_RESULTS)
        doc["tasks"][0].update(metric=metric, score=score)
        assert (schema_errors(doc, "results") == []) is valid


class TestManifest:
    def test_round_trip(self):
        m = Manifest.from_dict(ONNX_MANIFEST)
        assert m.onnx.mask_output == "mask" and m.files[0].size == 10
        again = json.loads(json.dumps(m.to_dict()))
        assert schema_errors(again, "submission") == []
        assert Manifest.from_dict(again) == m
        assert m.frames_per_second == 50

    def test_container_manifest_round_trip(self):
        doc = copy.deepcopy(ONNX_MANIFEST)
        del doc["onnx"]
        doc["kind"] = "container"
        doc["container"] = {"image": "image.tar", "image_id": "sha256:" + "a" * 64,
                            "entrypoint": ["python3", "/app/entrypoint.py"]}
        m = Manifest.from_dict(doc)
        assert m.container.entrypoint == ("python3", "/app/entrypoint.py")
        assert Manifest.from_dict(m.to_dict()) == m

    @pytest.mark.parametrize(
        "mutate, expect",
        [
            (lambda d: d.update(sample_rate=44100), "sample_rate"),
            (lambda d: d.update(output_dim=0), "output_dim"),
            (lambda d: d.update(kind="pickle"), "kind"),
            (lambda d: d.pop("onnx"), "onnx"),
            (lambda d: d["files"].append({"path": "../evil", "sha256": "0" * 64, "size": 1}), "files/1/path"),
            (lambda d: d["files"].append({"path": "/etc/passwd", "sha256": "0" * 64, "size": 1}), "files/1/path"),
            (lambda d: d.update(surprise=True), "surprise"),
        ],
    )
    def test_invalid_manifest_refused_with_reason(self, mutate, expect):
        doc = copy.deepcopy(ONNX_MANIFEST)
        mutate(doc)
        with pytest.raises(SubmissionError) as info:
            Manifest.from_dict(doc)
        assert any(expect in r for r in info.value.reasons), info.value.reasons

    def test_not_json(self, tmp_path):
        p = tmp_path / "manifest.json"
        p.write_text("{nope")
        with pytest.raises(SubmissionError, match="not valid JSON"):
            Manifest.load(p)


class TestExtractProtocol:
    def test_request_round_trip(self):
        req = {"schema_version": 1, "sample_rate": 16000,
               "items": [{"id": "clip-0001", "path": "audio/clip-0001.wav", "num_samples": 16000}]}
        assert schema_errors(req, "extract_request") == []
        req["items"][0]["id"] = "../x"
        assert schema_errors(req, "extract_request")

    def test_response_requires_features_when_ok_and_error_when_not(self):
        ok = {"id": "a", "status": "ok", "features": "a.npy", "shape": [10, 64], "dtype": "float32"}
        bad = {"id": "b", "status": "error", "error": "decoder exploded"}
        assert schema_errors({"schema_version": 1, "items": [ok, bad]}, "extract_response") == []
        assert schema_errors({"schema_version": 1, "items": [{"id": "a", "status": "ok"}]}, "extract_response")
        assert schema_errors({"schema_version": 1, "items": [{"id": "b", "status": "error"}]}, "extract_response")
