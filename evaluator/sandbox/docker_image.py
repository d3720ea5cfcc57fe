"""Load a submission's image from its own ``docker save`` archive, never from what the engine holds.

    archive = verify_image_archive(Path("sub/image.tar"))   # every byte the image needs is in it
    ref = load_image(client, tar_path=Path("sub/image.tar"), image_id=archive.image_id, run_id="r1")
    ...                                                     # run containers from archive.image_id
    release_image(client, ref=ref)

Why verify before loading: ``docker load`` skips every layer whose chain the engine already holds, and
does not even read the file for it. An archive that names an image id (or layers) already on the
organizer's engine, without carrying them, would load and run another team's image. So the archive is
read first: ``manifest.json`` must describe one untagged image; its config blob must be in the archive
and hash to the image id; every layer listed must be in the archive (a regular file, or a link to one
inside the archive, as ``docker save`` writes for repeated layers) and its uncompressed bytes must hash
to the config's ``rootfs.diff_ids`` entry. Both layouts ``docker save`` writes are read: the legacy one
(``<id>.json``, ``<hex>/layer.tar``, Docker <= 24) and the OCI one (``blobs/sha256/<hex>``, Docker >= 25).
Layers may be plain tar (what ``docker save`` writes) or gzip/bzip2/xz compressed (what ``docker load``
also accepts); the uncompressed size is capped.

The loaded image is tagged ``xares-eval/sub-<sha12>:<owner>.<run>`` (`docker_cleanup.image_ref`): the tag
says which live process uses it, and `release_image` removes only that tag, so the image itself goes
when the last run using it lets go (an image that carries another tag, e.g. the participant's own build
tag, stays).

`scratch_paths` reads the one part of the image's runtime config that would otherwise widen the
sandbox: its VOLUMEs (see `evaluator.sandbox.docker_runtime` for every other field).
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import json
import logging
import lzma
import posixpath
import re
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import docker.errors
import requests

from evaluator.errors import EnvironmentUnavailable, SubmissionError, first_line
from evaluator.sandbox.docker_cleanup import OUR_LABELS, image_ref

log = logging.getLogger(__name__)

MAX_MANIFEST_BYTES = 1 << 20  # manifest.json of one image is a few hundred bytes
MAX_CONFIG_BYTES = 8 << 20  # an image config is a few KiB (its history grows with the layers)
MAX_LAYERS = 127  # overlay2 stacks at most 128 lower layers
MAX_IMAGE_BYTES = 32 << 30  # uncompressed layers of one image, all together
MAX_MEMBERS = 10_000  # tar entries (docker save writes about 4 per layer)
MAX_META_BYTES = 1 << 20  # a pax or GNU long-name header (tarfile reads it whole into memory)
CHUNK = 1 << 20  # bytes hashed per read
MAX_IMAGE_VOLUMES = 16  # VOLUME paths an image may declare (each gets its own capped tmpfs)
SANDBOX_MOUNTS = ("/input", "/output", "/tmp")  # mounted by the runtime itself
SYSTEM_PATHS = ("/proc", "/sys", "/dev")  # the kernel's; nothing may be mounted over or under them
_HEX64 = re.compile(r"[0-9a-f]{64}")
_MAGIC = {  # compressions `docker load` accepts for a layer, by their first bytes
    b"\x1f\x8b": gzip.open,
    b"BZh": bz2.open,
    b"\xfd7zXZ\x00": lzma.open,
}
_ZSTD = b"\x28\xb5\x2f\xfd"  # also accepted by newer engines; no decoder in the standard library


@dataclass(frozen=True)
class ImageArchive:
    """What a verified ``docker save`` archive holds."""

    image_id: str  # sha256:<hex> of the config blob
    config: dict  # the image config (Config, rootfs, history, ...)
    layers: tuple[str, ...]  # archive paths of the layers, bottom first
    uncompressed_bytes: int  # all layers, uncompressed


def verify_image_archive(tar_path: Path, *, max_bytes: int = MAX_IMAGE_BYTES) -> ImageArchive:
    """Check that a ``docker save`` archive carries every byte of exactly one untagged image.

    Args:
        tar_path: the archive.
        max_bytes: cap on the uncompressed layers, all together.

    Returns:
        The image id, config and layer paths.

    Raises:
        SubmissionError: not such an archive; tagged; a config or layer missing, or not matching its
            digest; over ``max_bytes``.
    """
    name = tar_path.name
    fix = "rebuild it with `xares-submit build` (docker save by image id)"
    try:
        _scan_headers(tar_path, name, fix)
        with tarfile.open(tar_path, "r:") as tar:
            entry = _manifest_entry(tar, name, fix)
            config_path = str(entry.get("Config") or "")
            digest = _blob_digest(config_path)
            if digest is None:
                raise SubmissionError(f"{name}: unexpected image config entry {config_path[:100]!r}; {fix}")
            raw = _read_member(tar, config_path, MAX_CONFIG_BYTES, name, "the image config")
            if hashlib.sha256(raw).hexdigest() != digest:
                raise SubmissionError(f"{name}: the image config {config_path} does not hash to its name; {fix}")
            config, diff_ids = _parse_config(raw, name, fix)
            layers = entry.get("Layers")
            if not isinstance(layers, list) or not all(isinstance(p, str) for p in layers):
                raise SubmissionError(f"{name}: manifest.json 'Layers' is not a list of paths; {fix}")
            if len(layers) != len(diff_ids):
                raise SubmissionError(f"{name}: manifest.json lists {len(layers)} layer(s) but the image config "
                                      f"needs {len(diff_ids)}; {fix}")
            total = 0
            for i, (path, want) in enumerate(zip(layers, diff_ids), start=1):
                what = f"layer {i} of {len(layers)} ({want[:19]}...)"
                got, size = _layer_digest(tar, path, name, what, max_bytes - total, max_bytes)
                if got != want:
                    raise SubmissionError(f"{name}: {what} in {path} hashes to {got[:19]}...; the archive must "
                                          f"carry the image's own layers; {fix}")
                total += size
    except (tarfile.TarError, OSError, EOFError, lzma.LZMAError, zlib.error) as e:
        raise SubmissionError(f"{name} is not a readable `docker save` archive ({first_line(e)}); {fix}") from e
    return ImageArchive(f"sha256:{digest}", config, tuple(layers), total)


def load_image(client, *, tar_path: Path, image_id: str, run_id: str) -> str:
    """Verify the archive, ``docker load`` it, and name the image for this run.

    Args:
        client: a docker client with a timeout long enough for a load.
        tar_path: the submission's image archive.
        image_id: the id the manifest declares (``sha256:<hex>``).
        run_id: the run that will use the image (part of the tag).

    Returns:
        The tag given to the image; pass it to `release_image` when done.

    Raises:
        SubmissionError: the archive is not self-contained, holds another image, or does not load.
    """
    archive = verify_image_archive(tar_path)
    if archive.image_id != image_id:
        raise SubmissionError(
            f"the image archive holds image {archive.image_id}, but manifest.json says "
            f"container.image_id={image_id}; rebuild the submission with xares-submit build"
        )
    ref = image_ref(image_id, run_id)
    repo, tag = ref.rsplit(":", 1)
    for attempt in (1, 2):  # a concurrent cleanup may delete the image between our load and our tag
        try:
            with open(tar_path, "rb") as f:
                loaded = client.images.load(f)
        except docker.errors.APIError as e:
            raise SubmissionError(f"docker load refused the image archive: {first_line(e)}") from e
        except requests.exceptions.RequestException as e:
            raise EnvironmentUnavailable(f"the Docker engine did not finish loading the image: {first_line(e)}") from e
        ids = sorted({img.id for img in loaded})
        if ids != [image_id]:  # cannot happen after the digest checks; never remove what came out
            raise SubmissionError(f"docker load gave image(s) {ids}, not {image_id}")
        try:
            client.api.tag(image_id, repository=repo, tag=tag)
            if client.images.get(ref).id == image_id:
                return ref
        except docker.errors.NotFound:
            log.debug("image %s vanished before it was tagged (attempt %d)", image_id, attempt)
    raise EnvironmentUnavailable(f"image {image_id} vanished from the Docker engine twice right after loading, "
                                 "or its tag names another image; is another process removing images?")


def release_image(client, *, ref: str) -> None:
    """Remove this run's tag; the image goes with it when nothing else names or uses it."""
    try:
        client.api.remove_image(ref, force=False, noprune=False)
    except (docker.errors.APIError, requests.exceptions.RequestException) as e:  # in use: cleanup retries later
        log.debug("could not release image %s: %s", ref, e)


def scratch_paths(config: dict) -> tuple[str, ...]:
    """The image's VOLUME paths, each to be covered by a size-capped tmpfs instead of a Docker volume.

    Docker gives every VOLUME of an image a writable, size-unlimited anonymous volume unless something
    is already mounted there; a tmpfs mount at the same path prevents it. Paths the runtime mounts itself
    (/input, /output, /tmp) need nothing more.

    Args:
        config: the image's ``Config`` (``docker image inspect``).

    Returns:
        Normalized absolute paths, sorted.

    Raises:
        SubmissionError: too many volumes, or one the runtime cannot cover (relative, the root, inside
            /input or /output, on /proc, /sys or /dev, odd characters); also when the image sets one
            of the evaluator's own labels.
    """
    taken = sorted(set(config.get("Labels") or {}) & set(OUR_LABELS))
    if taken:
        raise SubmissionError(f"the image sets the label(s) {taken}, which the evaluator uses to find its own "
                              "containers; remove them from the Dockerfile")
    declared = config.get("Volumes") or {}
    if not isinstance(declared, dict):
        raise SubmissionError("the image config's Volumes is not a mapping; rebuild the image")
    if len(declared) > MAX_IMAGE_VOLUMES:
        raise SubmissionError(f"the image declares {len(declared)} VOLUMEs, over {MAX_IMAGE_VOLUMES}; remove "
                              "VOLUME lines from the Dockerfile (only /tmp and /output are writable)")
    paths = set()
    for raw in declared:
        path = "/" + posixpath.normpath(str(raw)).lstrip("/") if str(raw).startswith("/") else ""
        nested = any(path.startswith(p + "/") for p in SANDBOX_MOUNTS[:2] + SYSTEM_PATHS)
        if (not re.fullmatch(r"/[A-Za-z0-9_./@+-]+", path) or nested or path in SYSTEM_PATHS):
            raise SubmissionError(f"the image declares VOLUME {str(raw)[:100]!r}, which the evaluator cannot "
                                  "cover with a capped tmpfs; remove that VOLUME line from the Dockerfile")
        if path not in SANDBOX_MOUNTS:
            paths.add(path)
    return tuple(sorted(paths))


# --------------------------------------------------------------------------------------------------


def _scan_headers(path: Path, name: str, fix: str) -> None:
    """Walk the tar headers before `tarfile` does, which keeps every entry and reads pax headers whole.

    Raises:
        SubmissionError: not a plain (uncompressed) tar, more than `MAX_MEMBERS` entries, or a
            metadata header over `MAX_META_BYTES`.
    """
    with open(path, "rb") as f:
        if f.read(512)[257:262] != b"ustar":  # compressed, or not a tar at all
            raise SubmissionError(f"{name} is not a plain tar archive; it must be the output of `docker save` "
                                  f"as it is, not compressed; {fix}")
        f.seek(0)
        for count in range(MAX_MEMBERS + 1):
            block = f.read(512)
            if len(block) < 512 or not block.strip(b"\0"):
                return  # end of archive (tarfile reports a truncated one)
            try:
                field = block[124:136]
                size = (int.from_bytes(field[1:], "big") if field[0] & 0x80
                        else int(field.strip(b"\0 ") or b"0", 8))
            except ValueError as e:
                raise SubmissionError(f"{name}: tar entry {count + 1} has no valid size; {fix}") from e
            if block[156:157] in (b"x", b"g", b"L", b"K") and size > MAX_META_BYTES:
                raise SubmissionError(f"{name}: tar entry {count + 1} has a {size}-byte metadata header; {fix}")
            f.seek((size + 511) // 512 * 512, 1)
    raise SubmissionError(f"{name} has more than {MAX_MEMBERS} entries; {fix}")


def _manifest_entry(tar: tarfile.TarFile, name: str, fix: str) -> dict:
    raw = _read_member(tar, "manifest.json", MAX_MANIFEST_BYTES, name, "manifest.json")
    try:
        entries = json.loads(raw)
    except ValueError as e:
        raise SubmissionError(f"{name}: manifest.json is not JSON ({first_line(e)}); {fix}") from e
    if not isinstance(entries, list) or len(entries) != 1 or not isinstance(entries[0], dict):
        count = len(entries) if isinstance(entries, list) else "no list of"
        raise SubmissionError(f"{name} must hold exactly one image, found {count} entries; {fix}")
    entry = entries[0]
    if entry.get("RepoTags"):  # a tagged archive would re-point names on the organizer's engine
        raise SubmissionError(f"the image archive carries tags {list(entry['RepoTags'])[:5]}; save the image "
                              "by id (xares-submit build does)")
    if entry.get("Parent") or entry.get("LayerSources"):  # a parent on the engine, layers fetched by URL
        raise SubmissionError(f"{name}: manifest.json names a parent image or foreign layer sources; the "
                              f"archive must carry the whole image itself; {fix}")
    return entry


def _blob_digest(path: str) -> str | None:
    """The hex digest a config path names: ``<hex>.json`` (legacy) or ``blobs/sha256/<hex>`` (OCI)."""
    m = re.fullmatch(r"(?:blobs/sha256/)?([0-9a-f]{64})(?:\.json)?", path)
    return m.group(1) if m else None


def _parse_config(raw: bytes, name: str, fix: str) -> tuple[dict, list[str]]:
    try:
        config = json.loads(raw)
    except ValueError as e:
        raise SubmissionError(f"{name}: the image config is not JSON ({first_line(e)}); {fix}") from e
    rootfs = config.get("rootfs") if isinstance(config, dict) else None
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list) or not diff_ids or rootfs.get("type") != "layers":
        raise SubmissionError(f"{name}: the image config has no rootfs.diff_ids; {fix}")
    if len(diff_ids) > MAX_LAYERS:
        raise SubmissionError(f"{name}: the image has {len(diff_ids)} layers, over {MAX_LAYERS}; squash some "
                              "RUN steps of the Dockerfile")
    for d in diff_ids:
        if not (isinstance(d, str) and d.startswith("sha256:") and _HEX64.fullmatch(d[7:])):
            raise SubmissionError(f"{name}: the image config lists a layer digest {str(d)[:80]!r}; {fix}")
    return config, diff_ids


def _member(tar: tarfile.TarFile, path: str, name: str, what: str) -> tarfile.TarInfo:
    norm = posixpath.normpath(path)
    if not path or path.startswith("/") or norm.startswith(".."):
        raise SubmissionError(f"{name}: {what} is at {path[:100]!r}, outside the archive")
    try:
        member = tar.getmember(norm)
    except KeyError:
        try:
            member = tar.getmember(path)
        except KeyError as e:
            raise SubmissionError(f"{name} does not carry {what}: no member {path[:100]}; the archive must hold "
                                  "the whole image instead of relying on what the Docker engine already has") from e
    if not (member.isfile() or member.issym() or member.islnk()):
        raise SubmissionError(f"{name}: {what} ({path[:100]}) is not a regular file")
    return member


def _open(tar: tarfile.TarFile, member: tarfile.TarInfo, name: str, what: str):
    try:  # links are followed inside the archive only (docker save links repeated layers)
        f = tar.extractfile(member)
    except KeyError as e:
        raise SubmissionError(f"{name}: {what} links to {member.linkname[:100]!r}, which is not in the "
                              "archive") from e
    if f is None:
        raise SubmissionError(f"{name}: {what} ({member.name[:100]}) is not a regular file")
    return f


def _read_member(tar: tarfile.TarFile, path: str, cap: int, name: str, what: str) -> bytes:
    f = _open(tar, _member(tar, path, name, what), name, what)
    raw = f.read(cap + 1)
    if len(raw) > cap:
        raise SubmissionError(f"{name}: {what} is over {cap >> 10} KiB")
    return raw


def _layer_digest(tar: tarfile.TarFile, path: str, name: str, what: str, budget: int,
                  cap_total: int) -> tuple[str, int]:
    """sha256 (``sha256:<hex>``) and size of a layer's uncompressed bytes, reading at most ``budget``."""
    f = _open(tar, _member(tar, path, name, what), name, what)
    head = f.read(6)
    f.seek(0)
    if head.startswith(_ZSTD):
        raise SubmissionError(f"{name}: {what} is zstd-compressed; save the image with plain `docker save`")
    opener = next((o for magic, o in _MAGIC.items() if head.startswith(magic)), None)
    stream = opener(f) if opener else f  # the bytes diff_ids hash are the uncompressed tar
    h, size = hashlib.sha256(), 0
    while chunk := stream.read(CHUNK):
        size += len(chunk)
        if size > budget:
            raise SubmissionError(f"{name}: the image's layers are over {cap_total >> 30} GiB uncompressed")
        h.update(chunk)
    return f"sha256:{h.hexdigest()}", size
