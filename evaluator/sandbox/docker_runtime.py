"""Run a container submission's encoder under Docker, hardened, behind the `Runtime` interface.

    with ContainerRuntime(root, manifest, Limits(wall_seconds=120)) as runtime:
        features = runtime.encode([np.zeros(16000, np.float32)])   # -> [array [T, D]]

Opening a runtime first removes what dead evaluator processes left on the engine (`cleanup_stale`),
then loads the image from the submission's own archive, verified layer by layer and tagged for this
run (`evaluator.sandbox.docker_image`). One ``encode`` call is one container start (the caller sends
many clips per call), in four steps as in grand-challenge's executor: *provision* a host folder with
``request.json`` and the WAVs, mounted read-only at /input (audio and the request only, never labels)
and a size- and file-count-capped tmpfs volume for /output; *run* the manifest's entrypoint by image id
with the flags of `hardened_flags`; *collect* /output with ``get_archive`` from the keeper, only after
the encoder's container is removed, so no process of it can still write there, and check every byte
against the contract (`extract_protocol`); *clean up* the containers, the volume and the host folder
whatever happened. Every engine call has a timeout (`CONTROL_TIMEOUT_S`; the wait for the encoder has
``Limits.wall_seconds``), so a hung container or engine is killed or given up on, never waited for.

Why a keeper container: a tmpfs is the only output cap that really holds on any filesystem, but Docker
unmounts a tmpfs (and empties a tmpfs volume) when the last container using it stops, so a tiny
``sleep`` container from the base image holds the volume open until /output is copied out.

The image's runtime config, field by field (everything else in the container comes from us):
  - ENV: ignored; every variable the image sets is unset (a bare ``KEY`` in the create call), so the
    container's OCI spec holds only our environment. That matters on GPU hosts: NVIDIA Container
    Toolkit hooks read the spec's environment (CVE-2025-23266, ``LD_PRELOAD`` in an image's ENV); GPUs
    are requested with ``device_requests``, never with ``NVIDIA_*`` variables. Keep the toolkit
    >= 1.17.8 anyway: other tools on the same host may start images without this care.
  - ENTRYPOINT, CMD: ignored; the manifest's entrypoint runs with an empty command.
  - USER: ignored; always 65534:65534.
  - VOLUME: each declared path gets an empty tmpfs capped at ``Limits.tmpfs_mb`` (charged to the
    memory limit like /tmp), which stops Docker from creating a writable, size-unlimited anonymous
    volume there; files the image keeps under such a path are hidden, and a failure says so. Paths we
    cannot cover (inside /input or /output, on /proc, /sys, /dev, more than 16) are refused at
    build/validate time with one line (`docker_image.scratch_paths`). Refusing every VOLUME would be as
    safe but would reject base images that declare one, which a Dockerfile cannot undo.
  - HEALTHCHECK: disabled (test NONE): no extra processes started by the engine.
  - STOPSIGNAL, StopTimeout: ignored; the stop signal is SIGKILL and we only ever kill with it.
  - EXPOSE: irrelevant: the network is ``none`` and no port is ever published.
  - WORKDIR: kept as the encoder's working directory (the root filesystem is read-only anyway).
  - ONBUILD, SHELL: build-time only; we never build from a submitted image, and the entrypoint is an
    exec-form list, so no shell reads SHELL.
  - LABEL: the evaluator's own label keys are refused (they would make a container look like ours).

The seccomp profile (`evaluator.sandbox.seccomp`) replaces the engine's default: ptrace and the other
calls an encoder never needs (namespaces, mounts, bpf, perf_event_open, keyrings, userfaultfd, ...)
fail with EPERM.
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
import threading
import uuid
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

import docker.errors
import docker.types
import numpy as np
import requests

import docker
from evaluator.errors import EnvironmentUnavailable, SandboxError, SandboxTimeout, SubmissionError, first_line
from evaluator.sandbox.base import Limits
from evaluator.sandbox.docker_cleanup import LABEL, RUN_LABEL, Owner, cleanup_stale
from evaluator.sandbox.docker_cleanup import labels as owner_labels
from evaluator.sandbox.docker_image import load_image, release_image, scratch_paths
from evaluator.sandbox.extract_protocol import read_response, untar_output, write_request
from evaluator.sandbox.seccomp import profile_json
from evaluator.submission.manifest import Manifest

__all__ = ["LABEL", "RUN_LABEL", "ContainerRuntime", "cleanup_stale", "connect", "hardened_flags", "load_image"]

log = logging.getLogger(__name__)

KEEPER_IMAGE = "xares/encoder-base:latest"  # holds the /output tmpfs open; built by `make base-image`
USER = "65534:65534"  # nobody:nogroup
CONTROL_TIMEOUT_S = 60  # seconds any engine call may take (create, start, kill, remove, inspect, logs)
LOAD_TIMEOUT_S = 600  # seconds between two replies of the engine while it loads an image
LOG_TAIL_LINES = 200  # lines of the (already size-capped) log read back per run
CLEAN_ENV = {  # the whole environment the encoder sees (plus OMP_NUM_THREADS)
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/tmp",
    "LANG": "C.UTF-8",
    "PYTHONUNBUFFERED": "1",
    "PYTHONDONTWRITEBYTECODE": "1",
    "XARES_INPUT": "/input",
    "XARES_OUTPUT": "/output",
}
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


# --------------------------------------------------------------------------------------------------
# The hardening flags, in one place. Every container we start (encoder and keeper) gets them.


def hardened_flags(*, memory_mb: int, cpus: float, pids: int, tmpfs_mb: int, log_bytes: int,
                   scratch: Sequence[str] = ()) -> dict:
    """The docker SDK ``containers.create`` keyword arguments that confine a container.

    ``scratch`` are the image's VOLUME paths: each gets its own tmpfs capped like /tmp, so the engine
    makes no anonymous volume for it.
    """
    tmpfs = {path: f"rw,nosuid,nodev,size={tmpfs_mb}m,mode=1777" for path in ("/tmp", *scratch)}
    return {
        "network_mode": "none",
        "read_only": True,
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges", f"seccomp={profile_json()}"],
        "healthcheck": {"test": ["NONE"]},  # the image's HEALTHCHECK would start processes of its own
        "stop_signal": "SIGKILL",  # the image's STOPSIGNAL is never used: we kill, and only with SIGKILL
        "user": USER,
        "init": True,  # docker-init reaps zombies and forwards signals
        "pids_limit": pids,
        "mem_limit": f"{memory_mb}m",
        "memswap_limit": f"{memory_mb}m",  # equal: no swap on top of the RAM limit
        "nano_cpus": int(cpus * 1e9),
        "ipc_mode": "private",
        "tmpfs": tmpfs,
        "ulimits": [docker.types.Ulimit(name="core", soft=0, hard=0)],
        "log_config": docker.types.LogConfig(
            type="json-file", config={"max-size": str(max(log_bytes, 4096)), "max-file": "1"}
        ),
    }


# --------------------------------------------------------------------------------------------------
# One keyword-only helper per Docker verb.


def connect(*, timeout: int = 600):
    """A docker client for the engine named by DOCKER_HOST (or the local socket).

    Raises:
        EnvironmentUnavailable: the SDK is missing or no engine answers.
    """
    try:
        client = docker.from_env(timeout=timeout)
        client.ping()
    except (docker.errors.DockerException, requests.exceptions.RequestException) as e:  # refused, no socket
        raise EnvironmentUnavailable(
            f"no Docker engine answers ({first_line(e)}); start dockerd (bash docker/ci-docker.sh) "
            "or make the socket readable for this user"
        ) from e
    return client


def create_volume(client, *, size_mb: int, max_files: int, labels: dict[str, str]):
    """A tmpfs volume owned by the sandbox user, capped in bytes and in files (inodes)."""
    opts = f"size={size_mb}m,nr_inodes={max_files},uid=65534,gid=65534,mode=0700"
    try:
        return client.volumes.create(
            driver="local", driver_opts={"type": "tmpfs", "device": "tmpfs", "o": opts}, labels=labels
        )
    except docker.errors.APIError as e:
        raise EnvironmentUnavailable(f"the Docker engine cannot create a tmpfs volume for /output: {first_line(e)}") from e


def start_container(client, *, image: str, entrypoint: Sequence[str], environment: list[str],
                    mounts: list, flags: dict, gpu: bool, labels: dict[str, str]):
    """Create and start a container; when the start fails, the container is removed before raising.

    Raises:
        EnvironmentUnavailable: a GPU was asked for and the engine cannot provide one.
        SandboxError: the engine refused to start the container.
    """
    extra = {}
    if gpu:
        extra["device_requests"] = [docker.types.DeviceRequest(count=-1, capabilities=[["gpu"]])]
    role = labels.get(LABEL, "sandbox")
    container = None
    try:
        container = client.containers.create(
            image, entrypoint=list(entrypoint), command=[], environment=environment, mounts=mounts,
            labels=labels, detach=True, **flags, **extra,
        )
        container.start()
    except docker.errors.APIError as e:
        if container is not None:
            remove_container(container)
        text = first_line(e)
        if gpu and re.search(r"device driver|gpu|nvidia", text, re.IGNORECASE):
            raise EnvironmentUnavailable(
                f"a GPU was requested (Limits.gpu) but the Docker engine cannot provide one ({text}); "
                "install the NVIDIA Container Toolkit, or run without a GPU"
            ) from e
        raise SandboxError(f"the Docker engine could not start the {role} container: {text}") from e
    return container


def wait_container(container, *, timeout: float) -> int | None:
    """The exit code, or None when the container still runs after ``timeout`` seconds."""
    try:
        return int(container.wait(timeout=timeout)["StatusCode"])
    except (requests.exceptions.ReadTimeout, requests.exceptions.ConnectionError):
        return None


def container_logs(container, *, max_bytes: int, stdout: bool = True) -> str:
    """The tail of stderr (and stdout); the json-file log is already capped on disk by `hardened_flags`."""
    try:
        raw = container.logs(stdout=stdout, stderr=True, tail=LOG_TAIL_LINES)
    except (docker.errors.APIError, requests.exceptions.RequestException) as e:  # a courtesy: never hide the failure
        return f"(logs unavailable: {first_line(e)})"
    return raw[-max_bytes:].decode("utf-8", errors="replace")


def copy_out(container, *, path: str, dest: Path, max_bytes: int) -> Path:
    """Stream ``path`` out of a running container into ``dest/out.tar``, refusing more than ``max_bytes``."""
    bits, _ = container.get_archive(path)
    out = dest / "out.tar"
    written = 0
    with open(out, "wb") as f:
        for chunk in bits:
            written += len(chunk)
            if written > max_bytes:
                raise SandboxError(f"/output holds more than {max_bytes >> 20} MiB (Limits.output_mb)")
            f.write(chunk)
    return out


def kill_container(container) -> None:
    """Stop it now (SIGKILL); already-stopped is fine."""
    try:
        container.kill()
    except (docker.errors.APIError, requests.exceptions.RequestException) as e:  # exited meanwhile, or gone
        log.debug("could not kill container %s: %s", getattr(container, "short_id", "?"), e)


def remove_container(container) -> None:
    """Kill and remove; already-gone is fine."""
    try:
        container.remove(force=True, v=True)
    except (docker.errors.APIError, requests.exceptions.RequestException) as e:  # gone, or the engine is
        log.debug("could not remove container %s: %s", getattr(container, "short_id", "?"), e)


def remove_volume(volume) -> None:
    try:
        volume.remove(force=True)
    except (docker.errors.APIError, requests.exceptions.RequestException) as e:
        log.debug("could not remove volume %s: %s", getattr(volume, "name", "?"), e)


def user_error(logs: str) -> str:
    """The last meaningful log line: what a participant needs to see first (grand-challenge style)."""
    for line in reversed(_ANSI.sub("", logs).splitlines()):
        line = line.strip()
        if line and re.search(r"[A-Za-z0-9]", line) and not set(line) <= set("^~ "):
            return line[:300] + ("..." if len(line) > 300 else "")
    return ""


# --------------------------------------------------------------------------------------------------


class ContainerRuntime:
    """The encoder of a ``kind: container`` submission, run by image id under `hardened_flags`.

    Args:
        root: the unpacked, verified submission (manifest.json and the image archive).
        manifest: its manifest (``container.image``, ``container.image_id``, ``container.entrypoint``).
        limits: resource caps; ``limits.gpu`` asks Docker for every GPU.
        workdir: where the per-call host folders go (default: the system temp dir).
        keeper_image: image of the container that holds /output open (the base image).
        run_id: value of the run label on every container and volume, and part of the image tag
            (default: random).

    Raises:
        SubmissionError: no container spec; the archive is missing, incomplete or holds another image;
            the image declares a VOLUME or label the sandbox cannot allow.
        EnvironmentUnavailable: no Docker engine, no seccomp, or the keeper image is missing.
    """

    name = "container"

    def __init__(self, root: Path, manifest: Manifest, limits: Limits, *, workdir: Path | None = None,
                 keeper_image: str = KEEPER_IMAGE, run_id: str | None = None):
        if manifest.kind != "container" or manifest.container is None:
            raise SubmissionError("manifest.json has no 'container' section; kind must be 'container'")
        self.manifest = manifest
        self.limits = limits
        self.device = "cuda" if limits.gpu else "cpu"
        self.calls = 0
        self.run_id = run_id or uuid.uuid4().hex[:16]  # labels everything this runtime creates in the engine
        self.last_log = ""  # capped log tail of the latest run, for --debug output
        self._peak_mb: float | None = None  # see peak_memory_mb
        self._workdir = workdir
        self._keeper_image = keeper_image
        self._owner = Owner.current()  # written on every object, so a later process can tell we died
        self._image_ref: str | None = None  # our tag on the loaded image, released by `close`
        self._client = connect(timeout=CONTROL_TIMEOUT_S)
        try:
            info = self._client.info()
            _check_engine(info)
            report = cleanup_stale(self._client)
            for line in report.removed:
                log.info("removed a leftover of a dead evaluator: %s", line)
            tar = _payload_file(Path(root), manifest.container.image)
            loader = connect(timeout=LOAD_TIMEOUT_S)
            try:
                self._image_ref = load_image(loader, tar_path=tar, image_id=manifest.container.image_id,
                                             run_id=self.run_id)
            finally:
                loader.close()
            config = self._client.images.get(manifest.container.image_id).attrs.get("Config") or {}
            self._image_env_keys = sorted({e.split("=", 1)[0] for e in config.get("Env") or []})
            self._scratch = scratch_paths(config)  # the image's VOLUMEs, each under a capped tmpfs
            self._check_keeper()
            if limits.gpu:
                self._check_gpu()
        except BaseException:
            self.close()
            raise
        self._swap_limited = bool(info.get("SwapLimit", True))
        self.isolation = self._describe(self._encoder_flags(), info, verified=False)

    # -- lifecycle ----------------------------------------------------------------------------------

    def encode(self, waves: Sequence[np.ndarray], *, timeout: float | None = None) -> list[np.ndarray]:
        """Encode a chunk of clips in one container run; see `Runtime.encode`."""
        clips = [np.ascontiguousarray(w, dtype=np.float32) for w in waves]
        if not clips:
            return []
        for w in clips:
            if w.ndim != 1 or w.size == 0:
                raise ValueError(f"encode expects non-empty 1-D clips, got shape {w.shape}")  # our bug
        self.calls += len(clips)
        work = Path(tempfile.mkdtemp(prefix="xares-container-", dir=self._workdir))
        containers, volume = [], None
        try:
            items = write_request(work / "input", clips)
            volume = create_volume(self._client, size_mb=self.limits.output_mb, max_files=2 * len(clips) + 16,
                                   labels=self._labels("output"))
            containers.append(self._start_keeper(volume))
            encoder = self._start_encoder(work / "input", volume)
            containers.append(encoder)
            self._run(encoder, timeout)
            self._retire(encoder)  # before /output is read: no process of the encoder is left to write
            out = work / "output"
            out.mkdir()
            tar = copy_out(containers[0], path="/output", dest=work,
                           max_bytes=(self.limits.output_mb << 20) + (8 << 20) + 4096 * len(clips))
            names = untar_output(tar, out)
            return read_response(out, names, items=items, manifest=self.manifest)
        finally:
            for c in reversed(containers):
                remove_container(c)
            if volume is not None:
                remove_volume(volume)
            shutil.rmtree(work, ignore_errors=True)

    def close(self) -> None:
        client, self._client = getattr(self, "_client", None), None
        if client is None:
            return
        if self._image_ref is not None:
            release_image(client, ref=self._image_ref)
        client.close()

    def __enter__(self) -> ContainerRuntime:  # noqa: PYI034 - typing.Self needs Python 3.11
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- steps --------------------------------------------------------------------------------------

    def _encoder_flags(self) -> dict:
        lim = self.limits
        return hardened_flags(memory_mb=lim.memory_mb, cpus=lim.cpus, pids=lim.pids, tmpfs_mb=lim.tmpfs_mb,
                              log_bytes=lim.log_bytes, scratch=self._scratch)

    def _labels(self, role: str) -> dict[str, str]:
        return owner_labels(role, self.run_id, self._owner)

    def _environment(self) -> list[str]:
        env = dict(CLEAN_ENV, OMP_NUM_THREADS=str(max(1, int(self.limits.cpus))))
        # A bare KEY unsets the image's variable (moby's ReplaceOrAppendEnvValues), so none leaks in.
        return [f"{k}={v}" for k, v in env.items()] + [k for k in self._image_env_keys if k not in env]

    def _start_keeper(self, volume):
        flags = hardened_flags(memory_mb=32, cpus=0.1, pids=8, tmpfs_mb=1, log_bytes=4096)
        mount = docker.types.Mount("/output", volume.name, type="volume", no_copy=True)
        return start_container(self._client, image=self._keeper_image, entrypoint=["sleep", "infinity"],
                               environment=[f"PATH={CLEAN_ENV['PATH']}"], mounts=[mount], flags=flags,
                               gpu=False, labels=self._labels("keeper"))

    def _start_encoder(self, input_dir: Path, volume):
        mounts = [
            docker.types.Mount("/input", str(input_dir), type="bind", read_only=True),
            docker.types.Mount("/output", volume.name, type="volume", no_copy=True),
        ]
        flags = self._encoder_flags()
        container = start_container(
            self._client, image=self.manifest.container.image_id, entrypoint=self.manifest.container.entrypoint,
            environment=self._environment(), mounts=mounts, flags=flags, gpu=self.limits.gpu,
            labels=self._labels("encoder"),
        )
        try:
            container.reload()
            self._verify(container.attrs, flags)
        except BaseException:
            remove_container(container)
            raise
        return container

    def peak_memory_mb(self) -> float | None:
        """Highest memory use of any encoder run so far (the cgroup's high-water mark), or None."""
        return self._peak_mb

    def _run(self, container, timeout: float | None = None) -> None:
        """Wait for the encoder; raise with its last log line when it did not exit cleanly."""
        budgeted = timeout is not None and timeout < self.limits.wall_seconds
        limit = timeout if budgeted else self.limits.wall_seconds
        with _MemoryWatch(container) as watch:
            code = wait_container(container, timeout=limit)
        if watch.peak_bytes:
            self._peak_mb = max(self._peak_mb or 0.0, watch.peak_bytes / 2**20)
        if code is None:
            kill_container(container)  # logs first, removal in encode's `finally`
        self.last_log = container_logs(container, max_bytes=self.limits.log_bytes)
        # stderr first: the streams interleave in any order, and errors (tracebacks) go to stderr.
        last = user_error(container_logs(container, max_bytes=self.limits.log_bytes, stdout=False))
        last = last or user_error(self.last_log)
        said = f"; last log line: {last}" if last else "; it printed nothing"
        if code is None:
            what = "what was left of the time budget" if budgeted else "Limits.wall_seconds"
            raise SandboxTimeout(f"the encoder did not finish within {limit:.0f} s ({what}) and was killed{said}")
        container.reload()
        if container.attrs["State"].get("OOMKilled"):
            raise SandboxError(f"the encoder ran out of memory (limit {self.limits.memory_mb} MiB, "
                               f"swap included) and was killed{said}")
        if code != 0:
            raise SandboxError(f"the encoder exited with code {code}{said}", reasons=self._volume_hint())

    def _volume_hint(self) -> list[str]:
        if not self._scratch:
            return []
        return [f"the image declares VOLUME {', '.join(self._scratch)}: the sandbox mounts an empty "
                f"{self.limits.tmpfs_mb} MiB tmpfs there, so files the image keeps under it are not visible"]

    def _retire(self, container) -> None:
        """Remove the exited encoder and make sure it is gone, so nothing of it can still touch /output.

        Raises:
            SandboxError: the engine did not remove it within `CONTROL_TIMEOUT_S`.
        """
        remove_container(container)
        try:
            self._client.api.inspect_container(container.id)
        except docker.errors.NotFound:
            return
        except (docker.errors.APIError, requests.exceptions.RequestException) as e:
            raise SandboxError(f"the encoder's container could not be removed ({first_line(e)}); its /output "
                               "is not collected") from e
        raise SandboxError("the encoder's container could not be removed; its /output is not collected")

    def _check_keeper(self) -> None:
        try:
            self._client.images.get(self._keeper_image)
        except docker.errors.ImageNotFound as e:
            raise EnvironmentUnavailable(
                f"the Docker runtime needs the {self._keeper_image} image to hold the /output volume; "
                "build it with `make base-image`"
            ) from e

    def _check_gpu(self) -> None:
        """Ask the engine for the GPUs once, up front, so a missing GPU fails before any work."""
        flags = hardened_flags(memory_mb=64, cpus=0.5, pids=8, tmpfs_mb=1, log_bytes=4096)
        probe = start_container(self._client, image=self._keeper_image, entrypoint=["true"],
                                environment=[f"PATH={CLEAN_ENV['PATH']}"], mounts=[], flags=flags, gpu=True,
                                labels=self._labels("gpu-check"))
        remove_container(probe)

    def _verify(self, attrs: dict, flags: dict) -> None:
        """Check the engine really applied the flags and the clean environment; refuse to run if not."""
        hc, cfg = attrs["HostConfig"], attrs["Config"]
        wrong = []
        if hc.get("NetworkMode") != "none":
            wrong.append(f"network {hc.get('NetworkMode')}")
        if not hc.get("ReadonlyRootfs"):
            wrong.append("root filesystem writable")
        if [c.upper() for c in hc.get("CapDrop") or []] not in (["ALL"], ["CAP_ALL"]):
            wrong.append(f"cap-drop {hc.get('CapDrop')}")
        if "no-new-privileges" not in (hc.get("SecurityOpt") or []):
            wrong.append("no-new-privileges missing")
        if cfg.get("User") != USER:
            wrong.append(f"user {cfg.get('User')!r}")
        if hc.get("PidsLimit") != flags["pids_limit"]:
            wrong.append(f"pids limit {hc.get('PidsLimit')}")
        if hc.get("Memory") != self.limits.memory_mb << 20:
            wrong.append(f"memory {hc.get('Memory')}")
        if not hc.get("Init"):
            wrong.append("no init")
        if flags["security_opt"][1] not in (hc.get("SecurityOpt") or []):
            wrong.append("seccomp profile missing")
        if ((cfg.get("Healthcheck") or {}).get("Test") or [None])[0] != "NONE":
            wrong.append(f"healthcheck {cfg.get('Healthcheck')}")
        if hc.get("PublishAllPorts") or hc.get("PortBindings"):
            wrong.append("ports published")
        if set(hc.get("Tmpfs") or {}) != set(flags["tmpfs"]):
            wrong.append(f"tmpfs mounts {sorted(hc.get('Tmpfs') or {})}")
        ours = {"/input", "/output"}  # anything else would be an (unlimited) volume of the image's
        extra = [m.get("Destination") for m in attrs.get("Mounts") or [] if m.get("Destination") not in ours]
        if extra:
            wrong.append(f"volumes at {extra}")
        env = cfg.get("Env") or []
        env_keys = {e.split("=", 1)[0] for e in env if "=" in e}  # bare KEYs are the unset markers
        expected = set(CLEAN_ENV) | {"OMP_NUM_THREADS"}
        if env_keys != expected:
            wrong.append(f"environment keys {sorted(env_keys ^ expected)} differ from the clean set")
        if cfg.get("Entrypoint") != list(self.manifest.container.entrypoint) or cfg.get("Cmd"):
            wrong.append(f"entrypoint {cfg.get('Entrypoint')} cmd {cfg.get('Cmd')}")
        if wrong:
            raise EnvironmentUnavailable("the Docker engine did not apply the sandbox settings: " + "; ".join(wrong))
        self.isolation = self._describe(flags, self._client.info(), verified=True)

    def _describe(self, flags: dict, info: dict, *, verified: bool) -> str:
        mem = flags["mem_limit"][:-1]
        swap = "= memory-swap" if self._swap_limited else "(engine lacks swap accounting: swap not capped)"
        volumes = f", image VOLUMEs as {self.limits.tmpfs_mb} MiB tmpfs ({len(self._scratch)})" if self._scratch else ""
        return (
            f"docker {info.get('ServerVersion', '?')} ({info.get('DefaultRuntime', '?')}): "
            f"network none, read-only rootfs, cap-drop ALL, no-new-privileges, seccomp (no ptrace, "
            f"namespaces, mounts, bpf, keyrings), user {USER}, init, "
            f"pids<={flags['pids_limit']}, memory {mem} MiB {swap}, cpus {flags['nano_cpus'] / 1e9:g}, "
            f"/tmp tmpfs {self.limits.tmpfs_mb} MiB, /output tmpfs {self.limits.output_mb} MiB{volumes}, "
            f"logs<={self.limits.log_bytes} B, clean env, no healthcheck, image by id from its own archive"
            + ("" if verified else " (requested; checked on the first run)")
        )


def _check_engine(info: dict) -> None:
    """Refuse engines on which the sandbox cannot hold: no seccomp, or image ids that are not config digests.

    Raises:
        EnvironmentUnavailable: with what to change on the host.
    """
    if not any("seccomp" in str(opt) for opt in info.get("SecurityOptions") or []):
        raise EnvironmentUnavailable("the Docker engine runs without seccomp support, so the sandbox cannot "
                                     "forbid ptrace and similar calls; use a kernel and dockerd with seccomp")
    status = {str(k): str(v) for k, v in (info.get("DriverStatus") or []) if isinstance(k, str)}
    if "containerd.snapshotter" in status.get("driver-type", ""):
        raise EnvironmentUnavailable("the Docker engine uses the containerd image store, where image ids are "
                                     "manifest digests, not the config digests submissions declare; set "
                                     '"features": {"containerd-snapshotter": false} in daemon.json')



def _payload_file(root: Path, rel: str) -> Path:
    path = root / rel
    if PurePosixPath(rel).is_absolute() or ".." in PurePosixPath(rel).parts or path.is_symlink():
        raise SubmissionError(f"container.image {rel!r} must be a plain path inside the submission")
    if not path.is_file():
        raise SubmissionError(f"container.image {rel!r} is not in the submission")
    return path


class _MemoryWatch:
    """Samples a running container's memory from the engine while we wait for it.

    The cgroup's high-water mark (``max_usage``, cgroup v1) or current use (v2) is read every
    ``period`` seconds; the cgroup vanishes when the container stops, so a run shorter than one sample
    is not measured (None) rather than guessed.
    """

    def __init__(self, container, period: float = 0.2):
        self.container, self.period = container, period
        self.peak_bytes: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="xares-memory-watch", daemon=True)

    def __enter__(self) -> _MemoryWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                stats = self.container.stats(stream=False, one_shot=True)
            except (docker.errors.APIError, requests.RequestException, ValueError):
                return  # the container is gone: nothing more to sample
            memory = stats.get("memory_stats") or {}
            used = memory.get("max_usage") or memory.get("usage")
            if used:
                self.peak_bytes = max(self.peak_bytes or 0, int(used))
            self._stop.wait(self.period)
