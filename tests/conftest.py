"""Shared test setup: offline Hugging Face, and markers for hardware needs."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: the test machine is shared


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
