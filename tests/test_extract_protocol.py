"""The container protocol's response check, on real files (no Docker needed for this side)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from evaluator.errors import SandboxError
from evaluator.sandbox.extract_protocol import RESPONSE_NAME, read_response
from evaluator.submission.manifest import Manifest


def manifest(**kw) -> Manifest:
    doc = {"schema_version": 2, "name": "c", "team": "t", "kind": "container", "sample_rate": 16000,
           "output_dim": 4, "max_audio_seconds": 30, "output_dtype": "float32", "files": [],
           "container": {"image": "image.tar", "image_id": "sha256:" + "0" * 64, "entrypoint": ["x"]}, **kw}
    return Manifest.from_dict(doc)


def respond(tmp_path, frames: int):
    np.save(tmp_path / "000000.npy", np.ones((frames, 4), np.float32))
    (tmp_path / RESPONSE_NAME).write_text(json.dumps({"schema_version": 1, "items": [
        {"id": "a", "status": "ok", "features": "000000.npy", "shape": [frames, 4], "dtype": "float32"}]}))
    return [RESPONSE_NAME, "000000.npy"], [{"id": "a", "path": "a.wav", "num_samples": 16000}]


def test_a_fixed_frame_encoder_may_return_1500_frames_for_one_second(tmp_path):
    names, items = respond(tmp_path, 1500)
    (out,) = read_response(tmp_path, names, items=items, manifest=manifest(frames="fixed"))
    assert out.shape == (1500, 4)


def test_frames_following_the_audio_are_held_to_the_hop(tmp_path):
    names, items = respond(tmp_path, 1500)
    with pytest.raises(SandboxError, match="1500 frames for 1 s, expected about 50"):
        read_response(tmp_path, names, items=items, manifest=manifest(frame_hop_ms=20))
