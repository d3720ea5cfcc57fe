"""The two file habits every stage shares: content digests, and writes that a kill cannot tear."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
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


def open_temp_beside(path: Path, mode: int | None = None) -> tuple[int, str]:
    """A new temp file in ``path``'s folder, for a write + rename: (fd, its path).

    Unlike ``tempfile.mkstemp`` (always 0600) it gets the mode of any file the process creates,
    0666 less the umask (0644 under the usual 022), so every output of a run has the same mode;
    ``mode`` (0o600 for a private key) is set exactly instead.
    """
    path = Path(path)
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 if mode is None else mode)
        except FileExistsError:
            continue
        if mode is not None:
            try:
                os.fchmod(fd, mode)  # the umask may have cleared bits the caller asked for
            except BaseException:
                os.close(fd)
                tmp.unlink(missing_ok=True)
                raise
        return fd, str(tmp)
    raise FileExistsError(f"no free temporary name beside {path}")


def atomic_write_text(path: Path, text: str, *, durable: bool = False, mode: int | None = None) -> None:
    """Write ``text`` to ``path`` through a temp file + rename: readers see the old file or the new one.

    ``durable`` also fsyncs before the rename, for markers that must survive a power cut (store indexes).
    ``mode``: the file's permission bits (0o600 for a secret); default 0666 less the umask, like ``open``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = open_temp_beside(path, mode)
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


# -- bounded parsers of untrusted bytes (submissions, encoder output) ---------------------------------


class UnsafeInput(ValueError):
    """Untrusted bytes that a parser refuses before allocating or recursing on them."""


def parse_json(data: str | bytes, *, max_depth: int = 64):
    """JSON from untrusted bytes: no NaN/Infinity (not JSON, and they pass a schema's ``number``), no
    nesting deeper than ``max_depth`` (the decoder would recurse until RecursionError).

    Raises:
        UnsafeInput: not JSON, a NaN/Infinity constant, or nested too deeply.
    """

    def constant(name: str):
        raise UnsafeInput(f"{name} is not a JSON number")

    try:
        doc = json.loads(data, parse_constant=constant)
    except RecursionError as e:
        raise UnsafeInput(f"nested more than {max_depth} levels deep") from e
    except (ValueError, UnicodeDecodeError) as e:
        raise UnsafeInput(str(e)) from e
    stack = [(doc, 1)]
    while stack:  # iteratively: the check must not recurse either
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            if depth > max_depth:
                raise UnsafeInput(f"nested more than {max_depth} levels deep")
            stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))
    return doc


def read_npy(source: bytes | Path, *, max_bytes: int):
    """A plain numeric .npy array whose header is checked before anything is allocated: a tiny file
    may declare a terabyte shape.

    Args:
        source: the file, or its bytes.
        max_bytes: the largest array accepted (shape x itemsize).

    Returns:
        A writable numpy array.

    Raises:
        UnsafeInput: not a version 1/2/3 .npy, an object or structured dtype, more than ``max_bytes``,
            or a data size that differs from what the header declares.
    """
    import io
    import math

    import numpy as np

    fmt = np.lib.format
    fp = open(source, "rb") if isinstance(source, (str, Path)) else io.BytesIO(source)  # noqa: SIM115
    with fp:
        try:
            version = fmt.read_magic(fp)
            if version == (1, 0):
                shape, fortran, dtype = fmt.read_array_header_1_0(fp)
            elif version in ((2, 0), (3, 0)):
                shape, fortran, dtype = fmt.read_array_header_2_0(fp)
            else:
                raise UnsafeInput(f".npy format version {version} is not supported")
        except UnsafeInput:
            raise
        except (ValueError, SyntaxError, TypeError, EOFError) as e:
            raise UnsafeInput(f"not a .npy file ({e})") from e
        if dtype.hasobject or dtype.kind not in "biuf" or dtype.fields:
            raise UnsafeInput(f".npy dtype {dtype} is not a plain numeric type")
        count = math.prod(shape)  # Python ints: no overflow
        nbytes = count * dtype.itemsize
        if nbytes > max_bytes:
            raise UnsafeInput(f".npy header declares shape {list(shape)} of {dtype} = {nbytes} bytes, "
                              f"over the {max_bytes}-byte limit")
        buf = bytearray(nbytes)
        got = fp.readinto(buf)
        if got != nbytes or fp.read(1):
            raise UnsafeInput(f".npy header declares {nbytes} bytes of data, the file holds "
                              f"{got if got != nbytes else 'more'}")
    return np.frombuffer(buf, dtype=dtype, count=count).reshape(shape, order="F" if fortran else "C")
