"""Who owns each Docker object the evaluator makes, and removing what dead evaluator processes left.

    from evaluator.sandbox.docker_cleanup import cleanup_stale
    report = cleanup_stale(client)          # every ContainerRuntime start does this
    xares-eval cleanup --dry-run            # the same on demand (evaluator/cli/cleanup.py)

Why: a hard-killed evaluator (SIGKILL, OOM killer, a lost machine) runs no ``finally``; its encoder and
keeper containers, the /output volume and the loaded image would stay on the engine for ever. Every
object therefore says who made it: containers, volumes and networks carry labels (`labels`), images
(whose labels are fixed by their config digest) carry a tag ``xares-eval/sub-<sha12>:<owner>.<run>``.
The owner token is ``<host key>-<pid>-<start>``: the host key hashes the hostname with the kernel's boot
id, and the pid's start time (clock ticks since boot, /proc/PID/stat) tells a live process from a
recycled pid. An owner on this host that no longer runs is *dead*, one on another host (an engine shared
over DOCKER_HOST, or an evaluator in another container) is *unknown* and is treated as live: only
``--all`` removes it. Objects without our labels or tags are never touched.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path

import docker.errors
import requests

log = logging.getLogger(__name__)

LABEL = "org.xares-eval.role"  # on every container, volume and network we create: keeper, encoder, output, ...
RUN_LABEL = "org.xares-eval.run"  # ... the creating runtime's run id
OWNER_LABEL = "org.xares-eval.owner"  # ... the creating process (`Owner.token`)
HOST_LABEL = "org.xares-eval.host"  # ... its hostname, for people reading `docker ps`
OUR_LABELS = (LABEL, RUN_LABEL, OWNER_LABEL, HOST_LABEL)  # an image carrying one of these is refused
IMAGE_REPO_PREFIX = "xares-eval/sub-"  # + the first 12 hex of the image id
_TOKEN = re.compile(r"([0-9a-f]{12})-([0-9]+)-([0-9]+)")
_TAG = re.compile(_TOKEN.pattern + r"\.([A-Za-z0-9_.-]{1,80})")


@dataclass(frozen=True)
class Owner:
    """A process that makes Docker objects: which host (and boot), which pid, started when."""

    host: str  # 12 hex: sha256 of hostname + boot id
    pid: int
    start: int  # clock ticks after boot (field 22 of /proc/PID/stat); tells a recycled pid apart

    @classmethod
    def current(cls) -> Owner:
        return cls(_host_key(), os.getpid(), _start_ticks(os.getpid()) or 0)

    @classmethod
    def parse(cls, token: str | None) -> Owner | None:
        m = _TOKEN.fullmatch(token or "")
        return cls(m.group(1), int(m.group(2)), int(m.group(3))) if m else None

    @property
    def token(self) -> str:
        return f"{self.host}-{self.pid}-{self.start}"

    def state(self) -> str:
        """``live``, ``dead`` (this host, the process is gone) or ``unknown`` (another host)."""
        if self.host != _host_key():
            return "unknown"
        return "live" if _start_ticks(self.pid) == self.start else "dead"


def labels(role: str, run_id: str, owner: Owner | None = None) -> dict[str, str]:
    """The labels of an object made for ``run_id`` by ``owner`` (default: this process)."""
    owner = owner or Owner.current()
    return {LABEL: role, RUN_LABEL: run_id, OWNER_LABEL: owner.token, HOST_LABEL: socket.gethostname()[:64]}


def image_ref(image_id: str, run_id: str, owner: Owner | None = None) -> str:
    """The name this process gives a loaded submission image while ``run_id`` uses it."""
    owner = owner or Owner.current()
    run = re.sub(r"[^A-Za-z0-9_.-]", "_", run_id)[:80] or "run"
    return f"{IMAGE_REPO_PREFIX}{image_id.split(':')[-1][:12]}:{owner.token}.{run}"


def parse_image_ref(ref: str) -> tuple[Owner, str] | None:
    """(owner, run id) of a name made by `image_ref`, None for any other name."""
    repo, _, tag = ref.rpartition(":")
    m = _TAG.fullmatch(tag)
    if not repo.startswith(IMAGE_REPO_PREFIX) or not m:
        return None
    return Owner(m.group(1), int(m.group(2)), int(m.group(3))), m.group(4)


# --------------------------------------------------------------------------------------------------


@dataclass
class CleanupReport:
    """What one cleanup pass removed (or would remove, dry run) and what it kept."""

    removed: list[str] = field(default_factory=list)  # "container xares-... (encoder, run ..., owner ... dead)"
    kept_live: list[str] = field(default_factory=list)  # objects of live or unknown owners, left alone
    failed: list[str] = field(default_factory=list)  # removals the engine refused (in use, timed out)


def cleanup_stale(client, *, include_live: bool = False, dry_run: bool = False) -> CleanupReport:
    """Remove the containers, volumes, networks and image tags that dead evaluator processes left.

    Only objects with our labels (images: our tag) are looked at; containers go first, so that the
    volumes and images they held can go too. Objects that vanish meanwhile (another process cleaning
    the same engine) are skipped silently.

    Args:
        client: a docker client (`docker_runtime.connect`); its timeout bounds every call.
        include_live: also remove objects of live processes and of owners on other hosts.
        dry_run: list what would be removed, remove nothing.

    Returns:
        One line per removed, kept and failed object.
    """
    report = CleanupReport()
    api = client.api
    try:
        containers = api.containers(all=True, filters={"label": LABEL})
        volumes = (api.volumes(filters={"label": LABEL}) or {}).get("Volumes") or []
        networks = api.networks(filters={"label": LABEL})
    except (docker.errors.APIError, requests.exceptions.RequestException) as e:
        report.failed.append(f"listing the engine's objects: {e}")
        return report
    for c in containers:
        name = (c.get("Names") or [c["Id"][:12]])[0].lstrip("/")
        _sweep(report, f"container {name}", c.get("Labels") or {}, include_live, dry_run,
               lambda c=c: api.remove_container(c["Id"], force=True, v=True))
    for v in volumes:
        _sweep(report, f"volume {v['Name'][:12]}", v.get("Labels") or {}, include_live, dry_run,
               lambda v=v: api.remove_volume(v["Name"], force=True))
    for n in networks:
        _sweep(report, f"network {n.get('Name')}", n.get("Labels") or {}, include_live, dry_run,
               lambda n=n: api.remove_network(n["Id"]))
    try:
        images = api.images()
    except (docker.errors.APIError, requests.exceptions.RequestException) as e:
        report.failed.append(f"listing the engine's images: {e}")
        return report
    for image in images:
        for ref in image.get("RepoTags") or []:
            parsed = parse_image_ref(ref)
            if parsed is None:
                continue
            owner, run_id = parsed
            fake_labels = {LABEL: "image", RUN_LABEL: run_id, OWNER_LABEL: owner.token}
            _sweep(report, f"image tag {ref}", fake_labels, include_live, dry_run,
                   lambda ref=ref: api.remove_image(ref, force=False, noprune=False))
    return report


def _sweep(report: CleanupReport, what: str, object_labels: dict, include_live: bool, dry_run: bool,
           remove) -> None:
    owner = Owner.parse(object_labels.get(OWNER_LABEL))
    state = owner.state() if owner else "unknown"  # made by a version without owner labels
    who = f"pid {owner.pid}" if owner else "no owner label"
    line = f"{what} ({object_labels.get(LABEL, '?')}, run {object_labels.get(RUN_LABEL, '?')}, {who}, {state})"
    if state != "dead" and not include_live:
        report.kept_live.append(line)
        return
    if dry_run:
        report.removed.append(line)
        return
    try:
        remove()
    except docker.errors.NotFound:
        return  # removed meanwhile by someone else: fine
    except (docker.errors.APIError, requests.exceptions.RequestException) as e:
        report.failed.append(f"{line}: {_short(e)}")
        return
    report.removed.append(line)
    log.info("removed %s", line)


def _short(e: BaseException) -> str:
    text = getattr(e, "explanation", None) or str(e)
    return str(text).splitlines()[0][:200] if str(text).strip() else type(e).__name__


@functools.lru_cache(maxsize=1)
def _host_key() -> str:
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    return hashlib.sha256(f"{socket.gethostname()}\0{boot}".encode()).hexdigest()[:12]


def _start_ticks(pid: int) -> int | None:
    """The start time of ``pid`` in clock ticks after boot, or None when no such process runs."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    try:  # the command name (field 2) may hold spaces and parentheses: split after the last ')'
        fields = stat.rsplit(")", 1)[1].split()
        state, start = fields[0], int(fields[19])
    except (IndexError, ValueError):
        return None
    return None if state in ("Z", "X") else start  # a zombie is dead, only not yet reaped
