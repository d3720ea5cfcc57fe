"""Shared test setup: offline Hugging Face, markers for hardware needs, and the Docker fixtures."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import threading
import uuid
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: the test machine is shared


def demo_a_world(root: Path, *, decoder_steps: int):
    """demo-a shards under ``root/data`` and a smoke decoder at ``root/decoder`` trained on their texts.

    Returns:
        (data_home, track) of demo-a.
    """
    from evaluator.data import generate_demo, get_track, iter_clips
    from evaluator.smoke_decoder import build_smoke_decoder

    data_home = root / "data"
    generate_demo("demo-a", data_home / "demo-a")
    track = get_track("demo-a", data_home=data_home)
    texts = [t for task in track.train_tasks
             for c in iter_clips(task, "train", data_home=data_home, limit=16) for t in c.targets]
    build_smoke_decoder(texts, root / "decoder", steps=decoder_steps)
    return data_home, track


def pytest_collection_modifyitems(config, items):
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="no usable CUDA device on this machine")
        for item in items:
            if "requires_gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def docker_client():
    """A Docker engine with the offline base image, or a skip (a failure under CI, which must run them)."""
    import docker
    from evaluator.errors import EnvironmentUnavailable
    from evaluator.sandbox import docker_runtime

    try:
        client = docker_runtime.connect(timeout=300)
    except EnvironmentUnavailable as e:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the Docker tests, but: {e}")
        pytest.skip(f"no Docker engine here ({e}); run `bash docker/ci-docker.sh` to start one")
    try:
        client.images.get(docker_runtime.KEEPER_IMAGE)
    except docker.errors.ImageNotFound:
        if os.environ.get("CI"):
            pytest.fail(f"{docker_runtime.KEEPER_IMAGE} is missing; .ci/run must build it (make base-image)")
        pytest.skip(f"{docker_runtime.KEEPER_IMAGE} is missing: run `make base-image`")
    yield client
    client.close()


# --------------------------------------------------------------------------------------------------
# Docker helpers shared by test_sandbox_docker.py and test_hostile_docker.py. The engine may be shared
# with other processes (a developer's other runs, other test sessions): objects are listed in one call
# each (no per-object inspect that could race with a removal) and compared through our labels.


def docker_ids(client, *, label: str | None = None, volumes: bool = False) -> set[str]:
    """Ids of containers (or names of volumes), optionally with a label, from one engine call."""
    filters = {"label": label} if label else {}
    if volumes:
        return {v["Name"] for v in (client.api.volumes(filters=filters) or {}).get("Volumes") or []}
    return {c["Id"] for c in client.api.containers(all=True, filters=filters)}


class ImageArchives:
    """``docker save`` of test images by id, made once per session and hard-linked into submissions."""

    def __init__(self, client, folder: Path):
        self.client, self.folder = client, folder
        self._lock = threading.Lock()

    def path(self, image_id: str) -> Path:
        tar = self.folder / f"{image_id.split(':')[-1]}.tar"
        with self._lock:
            if not tar.exists():
                part = tar.with_suffix(".part")
                with open(part, "wb") as f:
                    f.writelines(self.client.images.get(image_id).save(named=False))
                part.rename(tar)
        return tar

    def prepare(self, image_ids) -> None:
        """Save many images at once: one `docker save` writes their shared base layer once, then each
        image's own archive is cut out of it (several times faster than one save per image)."""
        todo = sorted({i for i in image_ids if not (self.folder / f"{i.split(':')[-1]}.tar").exists()})
        if len(todo) < 2 or shutil.which("docker") is None:
            return  # `path` saves them one by one
        multi = self.folder / "multi.tar.part"
        subprocess.run(["docker", "save", "-o", str(multi), *todo], check=True, capture_output=True, timeout=600)
        try:
            with tarfile.open(multi) as src:
                for entry in json.loads(src.extractfile("manifest.json").read()):
                    hexid = entry["Config"].split("/")[-1].removesuffix(".json")
                    part = self.folder / f"{hexid}.part"
                    with tarfile.open(part, "w") as dst:
                        own = dict(entry, RepoTags=None)
                        _add_bytes(dst, "manifest.json", json.dumps([own]).encode())
                        for name in [entry["Config"], *entry["Layers"]]:
                            f = src.extractfile(src.getmember(name))  # links resolved: plain files only
                            info = tarfile.TarInfo(name)
                            info.size = f.seek(0, io.SEEK_END)
                            f.seek(0)
                            dst.addfile(info, f)
                    part.rename(self.folder / f"{hexid}.tar")
        finally:
            multi.unlink(missing_ok=True)

    def link(self, image_id: str, dest: Path) -> Path:
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(self.path(image_id), dest)
        except OSError:  # another filesystem
            shutil.copyfile(self.path(image_id), dest)
        return dest


@contextlib.contextmanager
def built_images(client, archives, context: Path, cases: Path, tag_prefix: str):
    """case name -> image id, one image per ``cases/<case>/Dockerfile`` built in ``context`` from the
    offline base image, saved once into ``archives``; the tags are removed afterwards."""
    import docker.errors

    from evaluator.sandbox.docker_runtime import KEEPER_IMAGE

    ids = {}
    try:
        for folder in sorted(p for p in cases.iterdir() if (p / "Dockerfile").is_file()):
            image, _ = client.images.build(
                path=str(context), dockerfile=str((folder / "Dockerfile").relative_to(context)),
                tag=f"{tag_prefix}{folder.name}:latest", buildargs={"BASE_IMAGE": KEEPER_IMAGE}, rm=True,
                forcerm=True)
            ids[folder.name] = image.id
        archives.prepare(ids.values())
        yield ids
    finally:
        for name in ids:
            with contextlib.suppress(docker.errors.APIError):
                client.images.remove(f"{tag_prefix}{name}:latest")


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="session")
def docker_archives(docker_client, tmp_path_factory):
    folder = tmp_path_factory.mktemp("image-archives")
    yield ImageArchives(docker_client, folder)
    shutil.rmtree(folder, ignore_errors=True)  # a few hundred MiB per image


@pytest.fixture
def make_submission(docker_archives):
    """(root, image_id, **manifest fields) -> Manifest of a container submission with the image's archive."""

    def make(root: Path, image_id: str, **fields):
        from evaluator.submission.manifest import Manifest

        root.mkdir(parents=True, exist_ok=True)
        docker_archives.link(image_id, root / "image.tar")
        doc = {
            "schema_version": 1, "name": "hostile", "team": "tests", "kind": "container", "sample_rate": 16000,
            "output_dim": 8, "frame_hop_ms": 20, "max_audio_seconds": 30, "output_dtype": "float32",
            "files": [],
            "container": {"image": "image.tar", "image_id": image_id, "entrypoint": ["python3", "/opt/encoder.py"]},
        }
        doc.update(fields)
        return Manifest.from_dict(doc)

    return make


class Sandbox:
    """A workdir plus every runtime opened in it, so leftovers can be looked up by run label."""

    def __init__(self, work: Path):
        self.work = work
        self.run_ids: list[str] = []

    def open(self, root: Path, manifest, limits):
        from evaluator.sandbox.docker_runtime import ContainerRuntime

        self.run_ids.append(f"test-{uuid.uuid4().hex[:12]}")
        return ContainerRuntime(root, manifest, limits, workdir=self.work, run_id=self.run_ids[-1])


@pytest.fixture
def sandbox(docker_client, tmp_path):
    """After the test: no container, volume or image tag of its runtimes, and an empty workdir.

    Other processes may use a developer's engine at the same time, so objects are compared through our
    run labels there, and `docker ps -a` as a whole only under CI.
    """
    from evaluator.sandbox.docker_cleanup import RUN_LABEL

    client = docker_client
    everything = docker_ids(client)
    work = tmp_path / "work"
    work.mkdir()
    box = Sandbox(work)
    yield box
    assert box.run_ids, "the test opened no runtime"
    for rid in box.run_ids:
        label = f"{RUN_LABEL}={rid}"
        assert not docker_ids(client, label=label), "containers left behind"
        assert not docker_ids(client, label=label, volumes=True), "volumes left behind"
    tags = [t for image in client.api.images() for t in image.get("RepoTags") or []
            if any(t.endswith(f".{rid}") for rid in box.run_ids)]
    assert not tags, f"image tags left behind: {tags}"
    assert not list(work.iterdir()), f"host files left behind: {list(work.iterdir())}"
    if os.environ.get("CI"):  # nothing else uses CI's engine: `docker ps -a` must show nothing new
        assert not docker_ids(client) - everything
