"""Where shard files are: local patterns, and Hugging Face dataset repos cached under the data home.

Repo shards live at ``$XARES_DATA_HOME/<repo-relative path>`` (default ``./xares_data``), the layout
XARES-LLM's own downloader uses, so an existing XARES-LLM cache is reused as is. Missing repo files are
fetched with huggingface_hub; with ``HF_HUB_OFFLINE=1`` (or ``offline=True``) nothing is fetched and
the error lists exactly the files that are missing.

Example::

    paths = resolve_shards(task, "test", data_home=Path("xares_data"))
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from evaluator.data.patterns import expand_braces, has_glob
from evaluator.data.specs import Split, TaskSpec
from evaluator.errors import DataError
from evaluator.fileio import atomic_write_text, sha256_file
from evaluator.hub import HF_TIMEOUT_S, hub_endpoint, hub_unreachable

log = logging.getLogger(__name__)

DATA_HOME_ENV = "XARES_DATA_HOME"
DEFAULT_DATA_HOME = "xares_data"  # relative to the current directory, as in XARES-LLM
DIGEST_DIR = ".xares-eval/digests"  # under the data home: one small file per (path, size, mtime)
MAX_LISTED = 20  # missing files named in an error before "... and N more"


def data_home(path: Path | str | None = None) -> Path:
    """The data cache folder: ``path``, else ``$XARES_DATA_HOME``, else ``./xares_data``."""
    if path is not None and str(path) != "":
        return Path(path).expanduser()
    env = os.environ.get(DATA_HOME_ENV)
    return Path(env).expanduser() if env else Path.cwd() / DEFAULT_DATA_HOME


def hf_offline() -> bool:
    """Whether huggingface_hub is told to stay offline (``HF_HUB_OFFLINE``), read at call time."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class ShardFile:
    """One shard file a split names: its display name (repo-relative or pattern-expanded), local path."""

    name: str
    path: Path
    repo_id: str | None

    @property
    def present(self) -> bool:
        return self.path.is_file()


@dataclass(frozen=True)
class ShardStatus:
    """How much of a split is on disk (no download attempted)."""

    split: str
    files: tuple[ShardFile, ...]
    unmatched: tuple[str, ...]  # local glob patterns that matched nothing

    @property
    def total(self) -> int:
        return len(self.files) + len(self.unmatched)

    @property
    def missing(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.files if not f.present) + self.unmatched

    @property
    def complete(self) -> bool:
        return self.total > 0 and not self.missing

    def describe(self) -> str:
        if self.total == 0:
            return "-"
        if self.complete:
            return f"present ({self.total} shard{'s' if self.total != 1 else ''})"
        return f"missing {len(self.missing)} of {self.total} shard files"


def shard_files(task: TaskSpec, split: Split, *, data_home: Path | None = None) -> ShardStatus:
    """Expand a split's patterns into files (braces always; globs for local patterns), sorted, no download.

    Args:
        task: the task.
        split: "train" or "test".
        data_home: the data cache folder (see `data_home`).

    Returns:
        The files and which are missing.
    """
    home = _home(data_home)
    repo = task.repo(split)
    files: dict[str, ShardFile] = {}
    unmatched: list[str] = []
    for pattern in task.shards(split):
        for name in expand_braces(pattern):
            if repo is not None:
                files.setdefault(name, ShardFile(name=name, path=home / name, repo_id=repo))
            elif has_glob(name):
                matches = sorted(glob.glob(name))
                if not matches:
                    unmatched.append(name)
                for m in matches:
                    files.setdefault(m, ShardFile(name=m, path=Path(m), repo_id=None))
            else:
                files.setdefault(name, ShardFile(name=name, path=Path(name), repo_id=None))
    ordered = tuple(files[k] for k in sorted(files))
    return ShardStatus(split=split, files=ordered, unmatched=tuple(unmatched))


def resolve_shards(
    task: TaskSpec,
    split: Split,
    *,
    data_home: Path | None = None,
    download: bool = True,
    offline: bool | None = None,
) -> list[Path]:
    """Local paths of every shard file of a split, fetching missing repo files when allowed.

    Args:
        task: the task.
        split: "train" or "test".
        data_home: the data cache folder (see `data_home`).
        download: fetch missing files of HF repos into the data home.
        offline: never touch the network (default: ``HF_HUB_OFFLINE``).

    Returns:
        The shard paths, sorted by name.

    Raises:
        DataError: the split names no shards, or files are missing and cannot be fetched; the error
            lists the missing files.
    """
    status = shard_files(task, split, data_home=data_home)
    if status.total == 0:
        raise DataError(f"task {task.id}: no {split} shards configured")
    home = _home(data_home)
    offline = hf_offline() if offline is None else offline
    to_fetch = [f for f in status.files if not f.present and f.repo_id is not None]
    if to_fetch and download and not offline:
        _download(task, split, to_fetch, home)
        status = shard_files(task, split, data_home=data_home)
    if status.missing:
        why = (
            "offline (HF_HUB_OFFLINE=1): nothing was downloaded"
            if offline and to_fetch
            else "download disabled"
            if to_fetch and not download
            else "local files not found"
        )
        raise DataError(
            f"task {task.id}: {len(status.missing)} of {status.total} {split} shard files missing under "
            f"{home if task.repo(split) else 'the given paths'} ({why})",
            reasons=_listed(status.missing, task.repo(split)),
        )
    return [f.path for f in status.files]


def _download(task: TaskSpec, split: str, files: list[ShardFile], home: Path) -> None:
    """Fetch repo files one by one; the first network failure stops the lot (no N x timeout waits)."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as e:  # pragma: no cover - a core dependency of transformers
        raise DataError("huggingface_hub is not installed; cannot download task data") from e
    unreachable = hub_unreachable()
    if unreachable:
        raise DataError(
            f"task {task.id}: cannot download {split} shards from {files[0].repo_id}: {unreachable} "
            "(set HF_HUB_OFFLINE=1 to skip downloads, or copy the files into the data home)",
            reasons=_listed([f.name for f in files], files[0].repo_id),
        )
    home.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(files):
        log.info("downloading %s:%s (%d/%d)", f.repo_id, f.name, i + 1, len(files))
        try:
            hf_hub_download(
                repo_id=f.repo_id,
                filename=f.name,
                repo_type="dataset",
                local_dir=home,
                etag_timeout=HF_TIMEOUT_S,
                endpoint=hub_endpoint(),  # the host the reachability probe checked
            )
        except Exception as e:  # network, auth, 404: all end the same way for the user
            remaining = [g.name for g in files[i:]]
            raise DataError(
                f"task {task.id}: cannot download {split} shards from {f.repo_id} into {home}: "
                f"{type(e).__name__}: {' '.join(str(e).split())[:300]}",
                reasons=_listed(remaining, f.repo_id),
            ) from e


def _listed(names: tuple[str, ...] | list[str], repo: str | None) -> list[str]:
    prefix = f"{repo}:" if repo else ""
    lines = [f"missing: {prefix}{n}" for n in list(names)[:MAX_LISTED]]
    if len(names) > MAX_LISTED:
        lines.append(f"... and {len(names) - MAX_LISTED} more")
    return lines


def _home(path: Path | None) -> Path:
    return data_home(path)


# ------------------------------------------------------------------------------------------- digests


def file_sha256(path: Path, *, cache_dir: Path | None = None) -> str:
    """Content sha256 of a file, cached by (absolute path, size, mtime) so big shards are hashed once.

    Args:
        path: the file.
        cache_dir: where cached digests live (None: no caching).

    Returns:
        The hex digest.

    Raises:
        DataError: the file cannot be read.
    """
    path = Path(path)
    try:
        st = path.stat()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from e
    entry = None
    if cache_dir is not None:
        ident = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        entry = Path(cache_dir) / hashlib.sha256(ident.encode()).hexdigest()[:40]
        try:
            cached = entry.read_text().strip()
            if len(cached) == 64:
                return cached
        except OSError:
            pass
    try:
        digest = sha256_file(path)
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from e
    if entry is not None:
        try:  # atomic: concurrent runs never see half a digest
            atomic_write_text(entry, digest)
        except OSError as e:
            log.debug("cannot cache digest of %s: %s", path, e)
    return digest


def shard_digests(
    task: TaskSpec, split: Split, *, data_home: Path | None = None, download: bool = True
) -> dict[str, str]:
    """Content sha256 of every shard file of a split, keyed by shard name (as used in clip keys).

    The feature store keys on these: a re-downloaded or edited shard gets new features.

    Raises:
        DataError: shards missing (see `resolve_shards`) or unreadable.
    """
    from evaluator.data.shards import shard_names

    paths = resolve_shards(task, split, data_home=data_home, download=download)
    cache_dir = _home(data_home) / DIGEST_DIR
    return {n: file_sha256(p, cache_dir=cache_dir) for n, p in zip(shard_names(paths), paths)}
