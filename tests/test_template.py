"""The shipped baseline: the committed ONNX export matches its torch source, and both kinds build."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import torch

from evaluator.resources import template_dir
from evaluator.submission.export import load_encoder


def test_committed_onnx_matches_the_torch_source():
    folder = template_dir()
    encoder = load_encoder(folder / "onnx" / "encoder.py")
    manifest = json.loads((folder / "onnx_model" / "manifest.json").read_text())["onnx"]
    session = ort.InferenceSession(str(folder / "onnx_model" / "model.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    audio = (0.1 * rng.standard_normal((2, 24000))).astype(np.float32)
    mask = np.ones_like(audio, dtype=np.int64)  # the exported graph takes the sample mask as int64
    mask[1, 16000:] = 0
    with torch.no_grad():
        want, want_mask = encoder(torch.from_numpy(audio), torch.from_numpy(mask).bool())
    got, got_mask = session.run([manifest["features_output"], manifest["mask_output"]],
                                {manifest["audio_input"]: audio, manifest["mask_input"]: mask})
    assert got.shape == tuple(want.shape) and got.shape[-1] == encoder.output_dim
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(got_mask.astype(bool), want_mask.numpy().astype(bool))
