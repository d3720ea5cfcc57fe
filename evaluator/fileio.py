"""The two file habits every stage shares: content digests, and writes that a kill cannot tear."""

from __future__ import annotations

import hashlib
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
