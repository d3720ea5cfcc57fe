"""Both template kinds extract features from generated speech through their real sandboxes, and a
second run does no encoder work (issue 3's done-when). The container case needs a Docker engine."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner

from evaluator.cli import eval_cli
from evaluator.data import load_audio, write_shard
from evaluator.features import FeatureStore
from evaluator.resources import template_dir
from evaluator.submission.build import BuildOptions, build

WORDS = ["yes", "no", "up", "down", "left", "right"]


@pytest.fixture(scope="module")
def speech_shard(tmp_path_factory):
    """Six spoken words (espeak-ng) in one webdataset shard, as real task data would be."""
    if shutil.which("espeak-ng") is None:
        pytest.fail("espeak-ng is missing: `make setup` installs it")
    root = tmp_path_factory.mktemp("speech")
    members = []
    for i, word in enumerate(WORDS):
        wav = subprocess.run(["espeak-ng", "--stdout", word], check=True, capture_output=True).stdout
        audio = load_audio(wav)  # 22.05 kHz from espeak-ng -> 16 kHz mono float32
        buf = io.BytesIO()
        sf.write(buf, audio, 16000, format="FLAC")
        members += [(f"w{i:03d}.flac", buf.getvalue()), (f"w{i:03d}.json", json.dumps({"text": word}).encode())]
    write_shard(root / "words_000000.tar.gz", members)
    return root / "words_000000.tar.gz"


def _extract(tar, shard, out):
    return CliRunner().invoke(eval_cli, ["extract", str(tar), "--data", str(shard), "--out", str(out)])


def _calls(output: str) -> int:
    return int(re.search(r"encoder calls: (\d+)", output).group(1))


def _check_twice(tar, shard, out, dim):
    first = _extract(tar, shard, out)
    assert first.exit_code == 0, first.output
    assert _calls(first.output) >= len(WORDS)
    (store,) = FeatureStore.scan(out)
    ds = store.dataset(prompt="Classify the keyword.")
    assert len(ds) == len(WORDS) and sorted(t for i in range(len(ds)) for t in ds.targets(i)) == sorted(WORDS)
    feats = [ds.features(i) for i in range(len(ds))]
    assert all(f.shape[1] == dim and f.shape[0] > 10 and np.isfinite(f).all() for f in feats)
    second = _extract(tar, shard, out)
    assert second.exit_code == 0, second.output
    assert _calls(second.output) == 0
    return feats


@pytest.mark.slow
def test_onnx_template_extracts_then_reuses(tmp_path, speech_shard):
    tar = tmp_path / "onnx.tar"
    build(template_dir() / "onnx", tar)
    _check_twice(tar, speech_shard, tmp_path / "features", dim=80)


@pytest.mark.docker
@pytest.mark.slow
def test_container_template_extracts_then_reuses(tmp_path, speech_shard, docker_client):
    tar = tmp_path / "container.tar"
    build(template_dir() / "container", tar, BuildOptions(source="container"))
    container = _check_twice(tar, speech_shard, tmp_path / "features", dim=80)
    # the container's numpy log-mel and the ONNX export compute the same features
    onnx_tar = tmp_path / "onnx.tar"
    build(template_dir() / "onnx", onnx_tar)
    onnx = _check_twice(onnx_tar, speech_shard, tmp_path / "features-onnx", dim=80)
    for a, b in zip(container, onnx):
        np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), atol=2e-2, rtol=1e-2)
    # nothing of this process is left (one engine call: other processes' containers come and go meanwhile)
    from evaluator.sandbox.docker_cleanup import OWNER_LABEL, Owner

    mine = docker_client.api.containers(all=True, filters={"label": f"{OWNER_LABEL}={Owner.current().token}"})
    assert mine == []
