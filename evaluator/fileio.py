"""The two file habits every stage shares: content digests, and writes that a kill cannot tear."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

BLOCK = 1 << 20  # bytes read at a time while hashing


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's content (submission tar, data shard, feature shard, model file)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(BLOCK), b""):
            h.update(block)
    return h.hexdigest()


class DigestCache:
    """sha256 of large files that rarely change (a decoder's 540 MB of weights), remembered by
    (path, size, mtime) in one JSON file, so a run does not re-read them every time.

    A changed file (other size or mtime) is hashed again; an unreadable cache is just a miss.
    Several processes may share the file: each rewrites it atomically, and a lost update costs one re-hash.
    """

    def __init__(self, path: Path):
        self.path = Path(path)

    def sha256(self, file: Path) -> str:
        file = Path(file).resolve()
        st = file.stat()
        stamp = [st.st_size, st.st_mtime_ns]
        entries = self._read()
        hit = entries.get(str(file))
        if isinstance(hit, list) and hit[:2] == stamp and isinstance(hit[-1], str):
            return hit[-1]
        digest = sha256_file(file)
        entries = self._read()  # another process may have added entries meanwhile
        entries[str(file)] = [*stamp, digest]
        try:
            atomic_write_text(self.path, json.dumps(entries, sort_keys=True))
        except OSError:  # a read-only output folder still gets its digest, just not remembered
            pass
        return digest

    def _read(self) -> dict:
        try:
            entries = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return entries if isinstance(entries, dict) else {}


def atomic_write_text(path: Path, text: str, *, durable: bool = False) -> None:
    """Write ``text`` to ``path`` through a temp file + rename: readers see the old file or the new one.

    ``durable`` also fsyncs before the rename, for markers that must survive a power cut (store indexes).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
