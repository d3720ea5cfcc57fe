"""The Docker runtime against a real engine: the template container works, hostile ones are refused.

Every hostile case must end in a SandboxError that names the reason, with this process alive and no
container, volume or host folder left behind. The hostile images (tests/resources/containers/*) are
tiny layers on xares/encoder-base, built once per module and `docker save`d once per session (the
runtime always loads a submission's image from its own archive). The fixtures `sandbox` and
`make_submission` are in conftest.py. Without a Docker engine these tests skip locally and fail under
CI=true (CI starts dockerd with docker/ci-docker.sh).
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import re
import resource
import shutil
import subprocess
import tarfile
import uuid
from dataclasses import replace
from pathlib import Path

import docker.errors
import numpy as np
import pytest
import soundfile as sf
import soxr
from conftest import built_images

from evaluator.errors import EnvironmentUnavailable, SandboxError, SubmissionError
from evaluator.resources import template_dir
from evaluator.sandbox import docker_runtime
from evaluator.sandbox.base import Limits
from evaluator.sandbox.docker_runtime import (
    ContainerRuntime,
    load_image,
    user_error,
)
from evaluator.submission.container import build_container_payload
from evaluator.submission.manifest import Manifest

pytestmark = pytest.mark.docker

HOSTILE = Path(__file__).parent / "resources" / "containers"
BASE = docker_runtime.KEEPER_IMAGE
LIMITS = Limits(memory_mb=256, cpus=1.0, pids=64, wall_seconds=60, output_mb=16, tmpfs_mb=16, log_bytes=64 << 10)
LENGTHS = (16000, 8000, 12345)  # samples: 1 s, 0.5 s, an odd length


@pytest.fixture(scope="module")
def client(docker_client):
    return docker_client


@pytest.fixture(scope="module")
def hostile_images(client, docker_archives):
    """case name -> image id, each built from tests/resources/containers/<case>/."""
    with built_images(client, docker_archives, HOSTILE, HOSTILE, "xares-test/") as ids:
        yield ids


def _write_image_tar(path: Path, image_id: str, tags) -> None:
    """An archive holding only a `docker save` manifest (refused before anything is loaded)."""
    data = json.dumps([{"Config": f"{image_id.split(':')[1]}.json", "RepoTags": tags, "Layers": []}]).encode()
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("manifest.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


def waves(lengths=LENGTHS) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in lengths]


def run_case(hostile_images, tmp_path, sandbox, make_submission, case: str, limits: Limits = LIMITS):
    manifest = make_submission(tmp_path / "sub", hostile_images[case])
    with sandbox.open(tmp_path / "sub", manifest, limits) as rt:
        return rt.encode(waves())


# --------------------------------------------------------------------------------------------------


HOSTILE_CASES = [
    ("network", {}, r"exited with code 1; last log line: .*(Network is unreachable|No route)"),
    ("write_outside", {}, r"exited with code 1; last log line: .*Read-only file system"),
    ("forkbomb", {"pids": 24}, r"exited with code 1; last log line: .*(Resource temporarily unavailable|BlockingIOError)"),
    ("memory", {"memory_mb": 128}, r"ran out of memory \(limit 128 MiB|MemoryError"),
    ("sleep", {"wall_seconds": 3}, r"did not finish within 3 s .*killed; last log line: going to sleep"),
    ("flood_output", {"output_mb": 4}, r"exited with code 1; last log line: .*No space left on device"),
    ("symlink_output", {}, r"/output/000000\.npy is a link \(to '/etc/passwd'\)"),
    ("nan", {}, r"item 000000: 1 NaN or infinite value"),
    ("wrong_dim", {}, r"item 000000: shape \[50, 7\], expected \[T, 8\]"),
    ("wrong_frames", {}, r"item 000000: (500 frames for 1 s, expected about 50|.*shape \[500, 8\].* over the)"),
    ("missing_items", {}, r"item 000002: missing from response\.json"),
    ("extra_files", {}, r"unexpected file\(s\) in /output: notes\.txt"),
]


class TestHostile:
    @pytest.mark.parametrize("case,limits,reason", HOSTILE_CASES, ids=[c[0] for c in HOSTILE_CASES])
    def test_refused_with_reason(self, hostile_images, tmp_path, sandbox, make_submission, case, limits, reason):
        with pytest.raises(SandboxError) as err:
            run_case(hostile_images, tmp_path, sandbox, make_submission, case, replace(LIMITS, **limits))
        text = " | ".join([str(err.value), *err.value.reasons])
        assert re.search(reason, text), text

    def test_gigabyte_of_stdout_is_capped(self, hostile_images, tmp_path, sandbox, make_submission, monkeypatch):
        sizes = []
        real_logs = docker_runtime.container_logs

        def logs_and_size(container, *, max_bytes, stdout=True):  # measure the log file before removal
            container.reload()
            path = Path(container.attrs.get("LogPath") or "")
            try:
                sizes.append(sum(p.stat().st_size for p in path.parent.glob(path.name + "*")))
            except OSError:  # not root: the log folder is unreadable, the tail check below still holds
                pass
            return real_logs(container, max_bytes=max_bytes, stdout=stdout)

        monkeypatch.setattr(docker_runtime, "container_logs", logs_and_size)
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        manifest = make_submission(tmp_path / "sub", hostile_images["chatty"])
        limits = replace(LIMITS, log_bytes=1 << 20)
        with sandbox.open(tmp_path / "sub", manifest, limits) as rt:
            with pytest.raises(SandboxError, match="last log line: chatty encoder gave up after 1 GiB"):
                rt.encode(waves())
            assert len(rt.last_log.encode()) <= limits.log_bytes
        grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
        assert grown_mib < 200, f"the evaluator grew by {grown_mib:.0f} MiB reading a chatty encoder"
        if sizes:  # json-file keeps at most the current file plus one rotated file
            assert sizes[0] <= 3 * limits.log_bytes, f"{sizes[0]} bytes of log kept on disk"

    def test_image_env_and_entrypoint_are_ignored(self, hostile_images, tmp_path, sandbox, make_submission):
        out = run_case(hostile_images, tmp_path, sandbox, make_submission, "clean_env")
        assert [o.shape for o in out] == [(50, 8), (25, 8), (39, 8)]

    def test_gpu_request_without_gpu_is_clear_and_leaves_nothing(self, client, hostile_images, tmp_path,
                                                                 sandbox, make_submission):
        if "nvidia" in (client.info().get("Runtimes") or {}):
            pytest.skip("this engine has the NVIDIA runtime: a GPU request may succeed")
        with pytest.raises(EnvironmentUnavailable, match="GPU was requested"):
            run_case(hostile_images, tmp_path, sandbox, make_submission, "clean_env", replace(LIMITS, gpu=True))

    def test_archive_with_another_image_id_is_refused(self, client, hostile_images, tmp_path, make_submission):
        manifest = make_submission(tmp_path / "sub", hostile_images["nan"])
        other = make_submission(tmp_path / "other", hostile_images["sleep"])
        (tmp_path / "sub" / "image.tar").unlink()
        os.link(tmp_path / "other" / "image.tar", tmp_path / "sub" / "image.tar")
        with pytest.raises(SubmissionError, match="the image archive holds image sha256:"):
            ContainerRuntime(tmp_path / "sub", manifest, LIMITS)
        assert other.container.image_id != manifest.container.image_id

    def test_tagged_archive_is_refused_before_loading(self, client, tmp_path):
        image_id = client.images.get(BASE).id
        _write_image_tar(tmp_path / "image.tar", image_id, tags=[BASE])
        with pytest.raises(SubmissionError, match="carries tags"):
            load_image(client, tar_path=tmp_path / "image.tar", image_id=image_id, run_id="test")


# --------------------------------------------------------------------------------------------------


def _speech(tmp_path: Path) -> np.ndarray:
    wav = tmp_path / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(wav), "the encoder runs once per clip"], check=True,
                   capture_output=True)
    audio, rate = sf.read(wav, dtype="float32", always_2d=True)
    return soxr.resample(audio.mean(axis=1), rate, 16000).astype(np.float32)


def _template_encode():
    spec = importlib.util.spec_from_file_location("template_entrypoint", template_dir() / "container" / "entrypoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.encode


def test_peak_memory_of_the_encoder_is_measured(hostile_images, tmp_path, sandbox, make_submission):
    manifest = make_submission(tmp_path / "sub", hostile_images["hungry"])
    with sandbox.open(tmp_path / "sub", manifest, LIMITS) as rt:
        assert rt.peak_memory_mb() is None  # nothing ran yet
        (out,) = rt.encode(waves((16000,)))
        peak = rt.peak_memory_mb()
    assert out.shape == (50, 8)
    assert peak is not None and 96 <= peak <= LIMITS.memory_mb, peak  # holds 96 MiB, capped at 256


class TestTemplate:
    def test_template_builds_saves_loads_and_extracts(self, client, tmp_path, sandbox):
        # A private copy with a unique label gives an image id nobody else holds, so removing our tag
        # really removes the image and the runtime must `docker load` the archive.
        folder = tmp_path / "template"
        shutil.copytree(template_dir() / "container", folder)
        with open(folder / "Dockerfile", "a") as f:
            f.write(f"\nLABEL org.xares-eval.test={uuid.uuid4().hex}\n")
        tag = "xares-test/template:latest"
        payload = build_container_payload(folder, tmp_path / "sub", tag=tag)
        assert payload.entrypoint == ("python3", "/opt/encoder/entrypoint.py")
        client.images.remove(tag)  # the runtime must load the archive itself (docker load, by id)
        with pytest.raises(docker.errors.ImageNotFound):
            client.images.get(payload.image_id)

        doc = json.loads((folder / "manifest.json").read_text())
        doc.update(schema_version=1, sample_rate=16000, files=[],
                   container={"image": "image.tar", "image_id": payload.image_id,
                              "entrypoint": list(payload.entrypoint)})
        manifest = Manifest.from_dict(doc)
        clips = [_speech(tmp_path), *waves((1, 4000))]
        with sandbox.open(tmp_path / "sub", manifest, LIMITS) as rt:
            first = rt.encode(clips)
            second = rt.encode(clips[:1])
            assert rt.calls == 4
            assert "network none" in rt.isolation and "requested" not in rt.isolation
            assert client.images.get(payload.image_id)  # loaded while the runtime is open
        with pytest.raises(docker.errors.ImageNotFound):  # ... and removed when it closes
            client.images.get(payload.image_id)

        reference = _template_encode()
        for clip, feats in zip(clips, first):
            assert feats.dtype == np.float32 and feats.shape == (-(-clip.size // 320), 80)
            assert np.isfinite(feats).all()
            np.testing.assert_allclose(feats, reference(clip), rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(second[0], first[0])  # deterministic across container starts


def test_user_error_picks_the_last_meaningful_line():
    logs = "loading\nTraceback (most recent call last):\n  x = 1/0\n      ^^^\nZeroDivisionError: division by zero\n\n"
    assert user_error(logs) == "ZeroDivisionError: division by zero"
    assert user_error("\x1b[31mred failure\x1b[0m\n   \n") == "red failure"
    assert user_error("") == ""
