"""The submission archive: pack a staged folder into ``submission.tar``, unpack one safely, verify it.

Layout of a submission (all at the archive root)::

    manifest.json      the contract (schemas/submission.schema.json); ``files`` lists the payload
    SHA256SUMS         ``sha256sum`` format, every member but itself (check with ``sha256sum -c``)
    build_report.json  what the probe measured at build time
    model.onnx ...     the payload

Unpacking treats the archive as hostile: every member is vetted first (type, path, size, count,
compression ratio), then the vetted members are extracted with the stdlib ``data`` filter as a
second line of defence.
"""

from __future__ import annotations

import contextlib
import json
import os
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

from evaluator.errors import SubmissionError, first_line
from evaluator.fileio import sha256_file
from evaluator.submission.manifest import CHECKSUMS_NAME, MANIFEST_NAME, Manifest, PayloadFile

GiB = 1 << 30
MiB = 1 << 20
DEFAULT_MAX_BYTES = 8 * GiB  # cap on a packed submission (an ONNX file is < 2 GiB; images can be bigger)
MAX_MANIFEST_BYTES = 1 * MiB
MAX_REASONS = 20  # member problems listed before "... and N more"


@dataclass(frozen=True)
class UnpackLimits:
    """What an archive may hold before it is refused as hostile."""

    max_members: int = 1000
    max_member_bytes: int = DEFAULT_MAX_BYTES
    max_total_bytes: int = DEFAULT_MAX_BYTES
    max_ratio: float = 100.0  # unpacked bytes / archive bytes (compression bombs)
    ratio_floor_bytes: int = 64 * MiB  # the ratio is only judged past this many unpacked bytes
    max_path_chars: int = 255




# -- pack --------------------------------------------------------------------------------------------


def _payload_paths(root: Path) -> list[str]:
    paths = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_symlink():
            raise SubmissionError(f"{rel} is a symbolic link; a submission holds regular files only")
        if p.is_file() and rel not in (MANIFEST_NAME, CHECKSUMS_NAME):
            paths.append(rel)
    return paths


def pack(root: Path, manifest: Manifest, output: Path, *, max_bytes: int = DEFAULT_MAX_BYTES) -> Manifest:
    """Write ``output`` from a staged folder: manifest (with its file list), SHA256SUMS and payload.

    Every regular file under ``root`` is payload. The tar is reproducible (sorted names, zero
    mtimes and owners) and written to a temporary name first, so a refused or failed pack never
    leaves a half-written archive behind.

    Args:
        root: staging folder holding the payload (and build_report.json).
        manifest: the manifest to write; its ``files`` is recomputed from ``root``.
        output: path of the tar to write.
        max_bytes: refuse when the payload and metadata add up to more than this.

    Returns:
        The manifest as written, with ``files`` filled in.

    Raises:
        SubmissionError: the payload is over ``max_bytes`` or holds a symbolic link.
    """
    root = Path(root)
    files = tuple(
        PayloadFile(path=rel, sha256=sha256_file(root / rel), size=(root / rel).stat().st_size)
        for rel in _payload_paths(root)
    )
    manifest = replace(manifest, files=files)
    Manifest.from_dict(manifest.to_dict())  # the written manifest must itself pass the schema
    (root / MANIFEST_NAME).write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")
    members = [MANIFEST_NAME] + [f.path for f in files]
    sums = "".join(f"{sha256_file(root / m)}  {m}\n" for m in members)
    (root / CHECKSUMS_NAME).write_text(sums)
    members.insert(1, CHECKSUMS_NAME)

    total = sum((root / m).stat().st_size for m in members)
    if total > max_bytes:
        raise SubmissionError(
            f"the submission would be {total / MiB:.1f} MiB, over the {max_bytes / MiB:.1f} MiB cap; "
            "shrink the model (e.g. float16 weights) or raise the cap (--max-size)"
        )
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(output.name + ".partial")
    try:
        with tarfile.open(partial, "w", format=tarfile.PAX_FORMAT) as tar:
            for m in members:
                tar.add(root / m, arcname=m, recursive=False, filter=_normalise)
        os.replace(partial, output)
    finally:
        partial.unlink(missing_ok=True)
    return manifest


def _normalise(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mtime = 0
    info.mode = 0o644
    return info


# -- unpack ------------------------------------------------------------------------------------------


def _member_problem(m: tarfile.TarInfo, limits: UnpackLimits) -> str | None:
    name = m.name
    if m.issym():
        return f"{name}: symbolic link (to {m.linkname!r}); only regular files are allowed"
    if m.islnk():
        return f"{name}: hard link (to {m.linkname!r}); only regular files are allowed"
    if m.ischr() or m.isblk():
        return f"{name}: device file; only regular files are allowed"
    if m.isfifo():
        return f"{name}: FIFO; only regular files are allowed"
    if not (m.isfile() or m.isdir()):
        return f"{name}: unsupported member type {m.type!r}; only regular files are allowed"
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return f"{name}: absolute path; members must be relative to the archive root"
    if "\\" in name or "\x00" in name:
        return f"{name!r}: backslash or NUL in the name"
    if ".." in PurePosixPath(name).parts:
        return f"{name}: '..' in the path (path traversal)"
    if len(name) > limits.max_path_chars:
        return f"{name[:60]}...: path longer than {limits.max_path_chars} characters"
    if m.size > limits.max_member_bytes:
        return f"{name}: {m.size} bytes, over the {limits.max_member_bytes} byte cap per member"
    return None


def safe_unpack(archive: Path, dest: Path, limits: UnpackLimits = UnpackLimits()) -> None:
    """Unpack an untrusted submission tar into ``dest`` (which should be a fresh, empty folder).

    Args:
        archive: the tar (uncompressed, gzip, bzip2 or xz).
        dest: where to extract; nothing is written anywhere else.
        limits: member count, sizes and compression ratio allowed.

    Raises:
        SubmissionError: not a tar, or hostile or oversized members (one reason per member).
    """
    archive, dest = Path(archive), Path(dest)
    archive_bytes = max(1, archive.stat().st_size)
    try:
        tar = tarfile.open(archive, "r:*")  # noqa: SIM115 - closed below; open errors reported apart
    except (tarfile.TarError, EOFError, OSError) as e:
        # tarfile lists every compression it tried on separate lines; the user needs the gist only
        raise SubmissionError(f"{archive.name} is not a readable tar archive ({first_line(e).rstrip(':')})") from e
    with tar:
        members, reasons, seen, total = [], [], set(), 0
        try:
            # Iterate lazily: a bomb is refused as soon as its running total passes a cap, before the
            # rest of it is decompressed.
            for m in tar:
                if len(members) + len(reasons) >= limits.max_members:
                    raise SubmissionError(
                        f"{archive.name} has more than {limits.max_members} members; a submission needs a handful"
                    )
                problem = _member_problem(m, limits)
                norm = PurePosixPath(m.name).as_posix()
                if not problem and norm in seen:
                    problem = f"{m.name}: appears twice in the archive"
                if problem:
                    reasons.append(problem)
                    continue
                seen.add(norm)
                total += m.size
                if total > limits.max_total_bytes:
                    raise SubmissionError(
                        f"{archive.name} unpacks to more than {limits.max_total_bytes} bytes (the cap)"
                    )
                if total > limits.ratio_floor_bytes and total / archive_bytes > limits.max_ratio:
                    raise SubmissionError(
                        f"{archive.name} expands more than {limits.max_ratio:g}x "
                        f"({total} bytes from {archive_bytes}): refused as a compression bomb"
                    )
                members.append(m)
        except (tarfile.TarError, EOFError, OSError, ValueError) as e:
            raise SubmissionError(f"{archive.name} is a corrupt or truncated tar archive: {e}") from e
        if reasons:
            shown = reasons[:MAX_REASONS]
            if len(reasons) > MAX_REASONS:
                shown.append(f"... and {len(reasons) - MAX_REASONS} more")
            raise SubmissionError(f"{archive.name} holds members that are not allowed", reasons=shown)
        if not members:
            raise SubmissionError(f"{archive.name} is an empty archive")
        dest.mkdir(parents=True, exist_ok=True)
        try:
            tar.extractall(dest, members=members, filter="data")
        except (tarfile.TarError, EOFError, OSError) as e:
            raise SubmissionError(f"{archive.name} could not be unpacked: {e}") from e


# -- verify ------------------------------------------------------------------------------------------


def _read_checksums(root: Path) -> tuple[dict[str, str], list[str]]:
    path = root / CHECKSUMS_NAME
    if not path.is_file():
        return {}, [f"no {CHECKSUMS_NAME} in the submission (rebuild it with xares-submit build)"]
    sums, problems, lines = {}, [], {}
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        return {}, [f"{CHECKSUMS_NAME} is not text"]
    for n, line in enumerate(text.splitlines(), 1):
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest) or not name:
            problems.append(f"{CHECKSUMS_NAME} line {n} is not '<sha256>  <path>': {line[:80]!r}")
            continue
        name = name.removeprefix("*")
        if name in sums:  # `sha256sum -c` checks every line: a second line must not hide a wrong first one
            problems.append(f"{CHECKSUMS_NAME} lists {name} twice (lines {lines[name]} and {n})")
            continue
        sums[name], lines[name] = digest, n
    return sums, problems


def verify_unpacked(root: Path) -> Manifest:
    """Check an unpacked submission: manifest schema, file list, sizes and sha256 sums.

    Args:
        root: the folder `safe_unpack` wrote.

    Returns:
        The parsed manifest.

    Raises:
        SubmissionError: missing/invalid manifest, or one reason per file that is missing, extra,
            or whose size or sha256 differs.
    """
    root = Path(root)
    mpath = root / MANIFEST_NAME
    if not mpath.is_file():
        found = sorted(p.relative_to(root).as_posix() for p in root.rglob(MANIFEST_NAME))
        hint = f" (found {found[0]}: pack the folder's contents, not the folder)" if found else ""
        raise SubmissionError(f"no {MANIFEST_NAME} at the archive root{hint}")
    if mpath.stat().st_size > MAX_MANIFEST_BYTES:
        raise SubmissionError(f"{MANIFEST_NAME} is over {MAX_MANIFEST_BYTES} bytes; it should be a few KB")
    manifest = Manifest.load(mpath)

    present = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    digests: dict[str, str] = {}

    def digest_of(rel: str) -> str:  # images can be GBs: hash each file once
        if rel not in digests:
            digests[rel] = sha256_file(root / rel)
        return digests[rel]

    sums, problems = _read_checksums(root)
    listed = {f.path: f for f in manifest.files}
    for rel in sorted(present - {MANIFEST_NAME, CHECKSUMS_NAME} - set(listed)):
        problems.append(f"{rel}: in the archive but not listed in manifest files")
    for rel, entry in sorted(listed.items()):
        path = root / rel
        if rel not in present:
            problems.append(f"{rel}: listed in manifest files but missing from the archive")
            continue
        size = path.stat().st_size
        if size != entry.size:
            problems.append(f"{rel}: {size} bytes, manifest says {entry.size}")
            continue
        digest = digest_of(rel)
        if digest != entry.sha256:
            problems.append(
                f"{rel}: sha256 {digest[:12]}... does not match the manifest's {entry.sha256[:12]}..."
            )
    if sums:
        for rel in sorted(present - {CHECKSUMS_NAME} - set(sums)):
            problems.append(f"{rel}: not listed in {CHECKSUMS_NAME}")
        for rel, digest in sorted(sums.items()):
            if rel not in present:
                problems.append(f"{rel}: listed in {CHECKSUMS_NAME} but missing from the archive")
            elif digest_of(rel) != digest:
                problems.append(f"{rel}: sha256 does not match {CHECKSUMS_NAME}")
    if problems:
        raise SubmissionError("the submission's checksums do not match its contents", reasons=problems)
    return manifest


@dataclass(frozen=True)
class Unpacked:
    """A verified submission in a temporary folder (valid inside the `unpacked` block only)."""

    root: Path  # holds manifest.json and the payload
    manifest: Manifest
    sha256: str  # of the archive: what results, features and checkpoints are keyed by


@contextlib.contextmanager
def unpacked(archive: Path, limits: UnpackLimits = UnpackLimits(), *, workdir: Path | None = None,
             step: Callable[[str], None] = lambda msg: None) -> Iterator[Unpacked]:
    """Unpack ``archive`` safely and verify manifest and checksums; the folder is removed afterwards.

    The one way validate, extract and run open a submission, so all three apply the same checks.

    Raises:
        SubmissionError: not a file, a hostile or broken archive, a bad manifest or checksum.
    """
    archive = Path(archive)
    if not archive.is_file():
        raise SubmissionError(f"{archive} is not a file")
    digest = sha256_file(archive)
    with tempfile.TemporaryDirectory(prefix="xares-submission-", dir=workdir) as tmp:
        root = Path(tmp) / "submission"
        step(f"Unpacking {archive.name} safely")
        safe_unpack(archive, root, limits)
        step("Checking manifest.json and checksums")
        yield Unpacked(root=root, manifest=verify_unpacked(root), sha256=digest)
