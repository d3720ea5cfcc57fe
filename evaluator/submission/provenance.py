"""Which files of a submission folder an ``encoder.py`` export used, and their copy into ``source/``.

The archive's ``source/`` is provenance, never executed: it should hold enough to re-run the export.
Three signs that a file was used, gathered while the export runs:

* **read**: an ``open`` audit event (``open()``, ``io.open_code``, ``os.open``, hence ``json.load``,
  ``torch.load``, ``np.load``) for a path inside the folder, seen by a process-wide audit hook;
* **imported**: a module in ``sys.modules`` whose ``__file__`` lies inside the folder (a cached
  ``.pyc`` means the ``.py`` itself is never opened);
* **named**: a file whose name appears in the text of a used ``.py`` file; readers written in
  native code (safetensors, onnxruntime) open files without an audit event.

Example::

    with record_reads(folder) as reads:
        encoder = load_encoder(folder / "encoder.py")
    copied = copy_sources(folder, used_files(folder, reads), staging / "source")
    report["source_files"] = copied.to_dict()
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

MiB = 1 << 20


@dataclass(frozen=True)
class SourceCaps:
    """What ``source/`` may hold: enough for code, configs and small weights, never a second model."""

    file_bytes: int = 64 * MiB  # a bigger file is left out (listed in the build report)
    total_bytes: int = 256 * MiB  # files past this running total are left out
    files: int = 200  # the archive's unpack limit is 1000 members
    path_chars: int = 200  # "source/<path>" must stay under the unpack limit of 255 characters
    scan_entries: int = 10_000  # folder entries looked at for file names in the source


SOURCE_CAPS = SourceCaps()  # what the build uses (read at call time)


# -- recording ---------------------------------------------------------------------------------------


class ReadLog:
    """Absolute paths opened for reading under ``folder`` while the recording was active."""

    def __init__(self, folder: Path):
        self.folder = Path(folder).resolve()
        self._prefix = str(self.folder) + os.sep
        self._paths: set[str] = set()

    def _seen(self, path: str) -> None:
        path = os.path.abspath(path)
        if path.startswith(self._prefix):
            self._paths.add(path)

    def files(self) -> list[str]:
        """Regular files read inside the folder, as sorted POSIX paths relative to it (links and
        ``__pycache__`` excluded)."""
        return sorted({rel for p in self._paths if (rel := _inside(self.folder, Path(p))) is not None})


_ACTIVE: list[ReadLog] = []  # recordings in progress; the hook returns at once when empty
_LOCK = threading.Lock()
_HOOKED = False
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _audit(event: str, args: tuple) -> None:
    # Runs on every audited event of the process for the rest of its life: return fast, never raise
    # (an exception here would make the participant's open() fail).
    if event != "open" or not _ACTIVE:
        return
    try:
        path, mode, flags = args
        if isinstance(path, int) or path is None:
            return
        if isinstance(mode, str) and any(c in mode for c in "wax"):
            return  # writing a file is not using it
        if mode is None and isinstance(flags, int) and flags & _WRITE_FLAGS and not flags & os.O_RDWR:
            return
        path = os.fsdecode(os.fspath(path))
        for log in tuple(_ACTIVE):
            log._seen(path)
    except Exception:  # noqa: BLE001 - see above
        return


@contextlib.contextmanager
def record_reads(folder: Path) -> Iterator[ReadLog]:
    """Record the files under ``folder`` that this process opens for reading inside the block.

    Audit hooks cannot be removed, so one hook is installed per process on first use and does
    nothing outside a recording. Every thread's opens count while the block is active.
    """
    global _HOOKED
    log = ReadLog(folder)
    with _LOCK:
        if not _HOOKED:
            sys.addaudithook(_audit)
            _HOOKED = True
        _ACTIVE.append(log)
    try:
        yield log
    finally:
        with _LOCK:
            _ACTIVE.remove(log)


def imported_files(folder: Path) -> dict[str, str]:
    """Modules in ``sys.modules`` loaded from ``folder``: {module name: path relative to it}."""
    folder = Path(folder).resolve()
    found = {}
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if isinstance(file, str) and (rel := _inside(folder, Path(os.path.abspath(file)))) is not None:
            found[name] = rel
    return found


def used_files(
    folder: Path, reads: ReadLog, *, main: str = "encoder.py", caps: SourceCaps | None = None
) -> list[str]:
    """Every file of ``folder`` the recorded export used: ``main``, imported modules, files read,
    and files named in the text of those ``.py`` files; sorted, relative POSIX paths."""
    folder = Path(folder).resolve()
    caps = caps or SOURCE_CAPS
    used = {main, *imported_files(folder).values(), *reads.files()}
    used = {rel for rel in used if _inside(folder, folder / rel) is not None}
    texts = []
    for rel in sorted(r for r in used if r.endswith(".py")):
        with contextlib.suppress(OSError, UnicodeDecodeError):
            texts.append((folder / rel).read_text())
    if texts:
        source = "\n".join(texts)
        names = (rel for rel in _folder_files(folder, caps.scan_entries) if "." in Path(rel).name.strip("."))
        used |= {rel for rel in names if Path(rel).name in source}  # "weights.safetensors", not "data"
    return sorted(used)


# -- copying -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceCopy:
    """What went into ``source/`` and what stayed out (for ``build_report.json``)."""

    included: tuple[str, ...]
    left_out: tuple[dict, ...]  # {"path", "bytes", "why"}
    caps: SourceCaps = field(default_factory=SourceCaps)

    def to_dict(self) -> dict:
        return {
            "included": list(self.included),
            "left_out": [dict(x) for x in self.left_out],
            "cap_bytes": self.caps.file_bytes,
            "cap_total_bytes": self.caps.total_bytes,
            "cap_files": self.caps.files,
        }


def copy_sources(
    folder: Path, files: Iterable[str], dest: Path, caps: SourceCaps | None = None
) -> SourceCopy:
    """Copy ``files`` (relative to ``folder``) into ``dest``, within ``caps``.

    Python files come first, then the rest from the smallest up, so a cap leaves out big weights
    rather than code. A path outside the folder, through a link, or not a regular file is left out.
    """
    folder, dest = Path(folder).resolve(), Path(dest)
    caps = caps or SOURCE_CAPS
    candidates, left_out = [], []
    for rel in dict.fromkeys(files):
        if _inside(folder, folder / rel) is None:
            left_out.append({"path": rel, "bytes": None, "why": "not a regular file inside the folder"})
            continue
        candidates.append((rel, (folder / rel).stat().st_size))
    candidates.sort(key=lambda x: (not x[0].endswith(".py"), x[1], x[0]))
    included, total = [], 0
    for rel, size in candidates:
        why = None
        if len("source/" + rel) > caps.path_chars or "\\" in rel:
            why = f"path longer than {caps.path_chars} characters or holding a backslash"
        elif size > caps.file_bytes:
            why = f"over the {caps.file_bytes / MiB:g} MiB cap per file"
        elif total + size > caps.total_bytes:
            why = f"over the {caps.total_bytes / MiB:g} MiB cap for source/"
        elif len(included) >= caps.files:
            why = f"over the {caps.files} file cap for source/"
        if why:
            left_out.append({"path": rel, "bytes": size, "why": why})
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(folder / rel, target, follow_symlinks=False)
        included.append(rel)
        total += size
    return SourceCopy(included=tuple(sorted(included)), left_out=tuple(left_out), caps=caps)


def _inside(folder: Path, path: Path) -> str | None:
    """``path`` relative to ``folder`` when it is a regular file reached without links and not
    under ``__pycache__``; else None."""
    try:
        rel = path.relative_to(folder)
    except ValueError:
        return None
    if not rel.parts or "__pycache__" in rel.parts or ".." in rel.parts:
        return None
    current = folder
    for part in rel.parts:  # no link anywhere on the way down
        current = current / part
        if current.is_symlink():
            return None
    return rel.as_posix() if current.is_file() else None


def _folder_files(folder: Path, limit: int) -> list[str]:
    """Regular files under ``folder`` (no links followed, no hidden or cache folders), at most
    ``limit`` entries looked at."""
    found, seen = [], 0
    for root, dirs, names in os.walk(folder):  # os.walk does not follow links to folders
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__")
        for name in sorted(names):
            seen += 1
            if seen > limit:
                return found
            path = Path(root) / name
            if not path.is_symlink() and path.is_file():
                found.append(path.relative_to(folder).as_posix())
    return found
