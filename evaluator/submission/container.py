"""Build the payload of a ``kind: container`` submission: ``docker build`` a folder, ``docker save`` by id.

    payload = build_container_payload(Path("my_encoder"), Path("work"), tag="xares-submit/my-encoder:build")
    payload.image_tar, payload.image_id, payload.entrypoint

The archive is saved by image id, so it carries no tags (the evaluator refuses tagged archives: loading
one would re-point names on the organizer's engine), and it is checked right away the way the evaluator
checks it (`evaluator.sandbox.docker_image`): every layer and the config present and matching their
digests, no VOLUME the sandbox cannot cover. An image that declares VOLUMEs gets a warning: the sandbox
mounts an empty, size-capped tmpfs over each, hiding what the image keeps there. When the offline base image ``xares/encoder-base``
exists locally it is passed as ``--build-arg BASE_IMAGE``, so a Dockerfile that starts with
``ARG BASE_IMAGE=python:3.11-slim`` / ``FROM ${BASE_IMAGE}`` builds without a registry.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from evaluator.errors import SubmissionError
from evaluator.sandbox.docker_image import scratch_paths, verify_image_archive
from evaluator.sandbox.docker_runtime import KEEPER_IMAGE, connect

log = logging.getLogger(__name__)

BASE_IMAGE = KEEPER_IMAGE  # built by `make base-image`
IMAGE_TAR = "image.tar"
BUILD_LOG_LINES = 20  # lines of `docker build` output shown when it fails


@dataclass(frozen=True)
class ContainerPayload:
    image_tar: Path  # the `docker save` archive, inside workdir
    image_id: str  # sha256:<64 hex>, the config digest the evaluator runs
    entrypoint: tuple[str, ...]  # the command implementing the extract protocol

    @property
    def image(self) -> Path:  # the name the submission builder reads
        return self.image_tar


def build_container_payload(folder: Path, workdir: Path, *, tag: str) -> ContainerPayload:
    """Build ``folder/Dockerfile`` and save the image into ``workdir``.

    Args:
        folder: the build context; holds a Dockerfile and optionally a (partial) manifest.json whose
            ``container.entrypoint`` wins over the image's ENTRYPOINT + CMD.
        workdir: where ``image.tar`` is written (created if needed).
        tag: name given to the built image on this machine (the archive itself is untagged).

    Returns:
        The archive path, the image id and the entrypoint.

    Raises:
        SubmissionError: no Dockerfile, the build fails, no entrypoint is declared, the saved archive is
            incomplete, or the image declares a VOLUME the sandbox cannot cover.
        EnvironmentUnavailable: no Docker engine answers.
    """
    folder = Path(folder)
    if not (folder / "Dockerfile").is_file():
        raise SubmissionError(f"{folder} has no Dockerfile (start from `xares-submit init DIR --kind container`)")
    client = connect()
    try:
        image_id = _build(client, folder, tag)
        image = client.images.get(image_id)
        entrypoint = _entrypoint(folder, image.attrs.get("Config") or {})
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        tar = workdir / IMAGE_TAR
        with open(tar, "wb") as f:
            f.writelines(image.save(named=False))  # by id: no RepoTags in the archive
    finally:
        client.close()
    log.info("saved %s (%s, %.1f MiB)", tar, image_id, tar.stat().st_size / 2**20)
    archive = verify_image_archive(tar)
    if archive.image_id != image_id:  # docker save wrote another image than the build made
        raise SubmissionError(f"docker save wrote image {archive.image_id}, expected {image_id}")
    volumes = scratch_paths(archive.config.get("config") or {})
    if volumes:
        log.warning("the image declares VOLUME %s: the evaluator mounts an empty, size-capped tmpfs there, "
                    "so files the image keeps under it are not visible to the encoder", ", ".join(volumes))
    return ContainerPayload(image_tar=tar, image_id=image_id, entrypoint=entrypoint)


def _build(client, folder: Path, tag: str) -> str:
    import docker.errors

    buildargs = {}
    try:
        client.images.get(BASE_IMAGE)
        buildargs["BASE_IMAGE"] = BASE_IMAGE
    except docker.errors.ImageNotFound:
        log.info("%s not found locally; the Dockerfile's own BASE_IMAGE default is used", BASE_IMAGE)
    lines: list[str] = []
    try:
        for chunk in client.api.build(path=str(folder), tag=tag, buildargs=buildargs, rm=True, forcerm=True,
                                      pull=False, decode=True):
            if "error" in chunk:
                raise SubmissionError(f"docker build failed: {str(chunk['error']).strip()}",
                                      reasons=lines[-BUILD_LOG_LINES:])
            text = str(chunk.get("stream", "")).rstrip()
            if text:
                lines.append(text)
                log.debug("docker build: %s", text)
    except docker.errors.APIError as e:
        raise SubmissionError(f"docker build failed: {e.explanation or e}", reasons=lines[-BUILD_LOG_LINES:]) from e
    try:
        return client.images.get(tag).id
    except docker.errors.ImageNotFound as e:
        raise SubmissionError(f"docker build produced no image tagged {tag}", reasons=lines[-BUILD_LOG_LINES:]) from e


def _entrypoint(folder: Path, config: dict) -> tuple[str, ...]:
    """manifest.json's container.entrypoint, else the image's ENTRYPOINT followed by its CMD."""
    manifest = folder / "manifest.json"
    if manifest.is_file():
        try:
            declared = (json.loads(manifest.read_text()).get("container") or {}).get("entrypoint")
        except (ValueError, AttributeError) as e:
            raise SubmissionError(f"{manifest} is not a JSON object: {e}") from e
        if declared:
            if not isinstance(declared, list) or not all(isinstance(a, str) for a in declared):
                raise SubmissionError("manifest.json container.entrypoint must be a list of strings")
            return tuple(declared)
    command = list(config.get("Entrypoint") or []) + list(config.get("Cmd") or [])
    if not command:
        raise SubmissionError(
            "the image has no ENTRYPOINT/CMD and manifest.json declares no container.entrypoint; "
            'add e.g. ENTRYPOINT ["python3", "/opt/encoder/entrypoint.py"] to the Dockerfile'
        )
    return tuple(command)
