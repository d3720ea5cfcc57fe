"""Webdataset shards (tar, tar.gz) to `Clip`s: members grouped by key, labels from json, audio decoded.

A sample is ``<key>.<audio ext>`` + ``<key>.json`` (consecutive members sharing the key), optionally with
``<key>.prompt`` (UTF-8 text: the clip's own prompt, used when the task's prompt is empty). Labels follow
XARES-LLM's rules exactly, because they decide which samples exist: the first json key (configured
``a;b;c``, then captions, caption, text) whose value is a string (even ""), a number (as ``str``) or a
non-empty list wins; each text then passes the reference's corrupt-text filter, at training and at
evaluation alike (`is_corrupt_text`), and a clip left with no text is skipped. Anything broken (a
corrupt member, unreadable or empty audio, a missing label, a truncated shard) is skipped and counted in
a `SkipReport`; reading goes on (the reference stops the run). Clip keys are
``<shard name>/<member key>``, unique and stable within a task split.

Example::

    report = SkipReport(task=task.id, split="test")
    for clip in iter_clips(task, "test", report=report):
        ...
    print(report.summary())
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import tarfile
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from evaluator.data.audio import AUDIO_EXTENSIONS, SAMPLE_RATE, load_audio
from evaluator.data.cache import resolve_shards
from evaluator.data.specs import Split, TaskSpec
from evaluator.errors import DataError

log = logging.getLogger(__name__)

LABEL_EXTENSIONS = ("json", "jsonl")
MAX_MEMBER_BYTES = 1 << 30  # one sample's file; bigger is a broken or hostile shard
MAX_EXAMPLES = 5  # per skip reason, kept in the report

# Skip reasons, in the order a report lists them.
CORRUPT_SHARD = "corrupt shard"
CORRUPT_MEMBER = "corrupt member"
DUPLICATE_KEY = "duplicate key"
MISSING_AUDIO = "missing audio"
UNREADABLE_AUDIO = "unreadable audio"
EMPTY_AUDIO = "empty audio"
MISSING_LABEL = "missing label"
CORRUPT_TEXT = "corrupt text"  # counts texts, not clips: a clip goes only when none of its texts is left
SKIP_REASONS = (CORRUPT_SHARD, CORRUPT_MEMBER, DUPLICATE_KEY, MISSING_AUDIO, UNREADABLE_AUDIO, EMPTY_AUDIO, MISSING_LABEL,
                CORRUPT_TEXT)
PROMPT_EXTENSION = "prompt"


@dataclass(frozen=True)
class Clip:
    """One sample: its stable key, mono float32 audio at 16 kHz, and its reference text(s)."""

    key: str  # "<shard name>/<member key>"
    audio: np.ndarray  # float32 [S] at 16 kHz
    targets: tuple[str, ...]  # one or more reference strings (several captions); "" is a valid target
    prompt: str | None = None  # the clip's own prompt (a ``<key>.prompt`` member), if it has one


@dataclass
class SkipReport:
    """What was read and what was skipped (and why) for one task split. Callers print and store it."""

    task: str = ""
    split: str = ""
    clips: int = 0  # clips yielded
    shards: int = 0  # shard files opened
    counts: Counter = field(default_factory=Counter)  # reason -> skipped samples (shards for "corrupt shard")
    examples: dict[str, list[str]] = field(default_factory=dict)  # reason -> first few "where: detail"

    def add(self, reason: str, where: str, detail: str = "") -> None:
        """Count one skipped sample (or shard) and keep the first few examples."""
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}")
        self.counts[reason] += 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < MAX_EXAMPLES:
            ex.append(f"{where}: {detail}" if detail else where)
        log.info("skipped %s (%s)%s", where, reason, f": {detail}" if detail else "")

    @property
    def skipped(self) -> int:
        """Skipped samples (corrupt shards are counted separately: their lost samples are unknown)."""
        return sum(n for r, n in self.counts.items() if r != CORRUPT_SHARD)

    def summary(self) -> str:
        """One line, e.g. ``esc-50/test: 398 clips from 1 shard; skipped 2 (1 corrupt member, 1 empty audio)``."""
        head = f"{self.task}/{self.split}: " if self.task else ""
        line = f"{head}{self.clips} clips from {self.shards} shard{'s' if self.shards != 1 else ''}"
        parts = [f"{self.counts[r]} {r}" for r in SKIP_REASONS if self.counts.get(r) and r != CORRUPT_SHARD]
        if parts:
            line += f"; skipped {self.skipped} ({', '.join(parts)})"
        if self.counts.get(CORRUPT_SHARD):
            n = self.counts[CORRUPT_SHARD]
            line += f"; {n} corrupt shard{'s' if n != 1 else ''} read only in part"
        return line

    def lines(self) -> list[str]:
        """The summary, then indented examples per reason."""
        out = [self.summary()]
        for r in SKIP_REASONS:
            for ex in self.examples.get(r, []):
                out.append(f"  - {r}: {ex}")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "split": self.split,
            "clips": self.clips,
            "shards": self.shards,
            "skipped": self.skipped,
            "counts": {r: self.counts[r] for r in SKIP_REASONS if self.counts.get(r)},
            "examples": {r: list(v) for r, v in self.examples.items()},
        }


def extract_targets(doc: Any, keys: Iterable[str]) -> tuple[str, ...]:
    """Reference texts from a sample's json, by XARES-LLM's rule (``text_from_json``).

    The first key whose value is a string (the empty string included), a number (its ``str``) or a
    non-empty list wins; a list gives one text per string or number in it. Corrupt texts are NOT removed
    here: see `usable_targets`.

    Returns:
        The texts, or an empty tuple when no key holds a label.
    """
    if not isinstance(doc, dict):
        return ()
    for k in keys:
        value = doc.get(k)
        if isinstance(value, list):
            texts = tuple(t for t in map(_as_text, value) if t is not None)
            if texts:
                return texts
        elif (text := _as_text(value)) is not None:
            return (text,)
    return ()


def _as_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)):  # bools too: the reference writes True as "True"
        return str(value)
    return None


def is_corrupt_text(text: str) -> bool:
    """XARES-LLM's corrupt-text filter: such a text is no sample, neither in training nor in the test set.

    Corrupt: more than 3 combining diacritics (U+0301..U+036F), more than half of the characters not
    alphanumeric, or longer than 10 characters with fewer than 4 distinct ones. The empty string is not
    corrupt (an empty label is a valid target).
    """
    if not text:
        return False
    diacritics = sum(1 for c in text if 0x0300 < ord(c) < 0x0370)
    alphanumeric = sum(1 for c in text if c.isalnum())
    if diacritics > 3 or (len(text) - alphanumeric) / len(text) > 0.5:
        return True
    return len(text) > 10 and len(set(text)) < 4


def usable_targets(texts: Iterable[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Split texts into (kept, corrupt) by `is_corrupt_text`, each in the original order."""
    kept, corrupt = [], []
    for t in texts:
        (corrupt if is_corrupt_text(t) else kept).append(t)
    return tuple(kept), tuple(corrupt)


def shard_names(paths: list[Path]) -> list[str]:
    """Short unique names for shard paths: the file name, or more trailing folders where names collide.

    MECAT has ``0M0/test_0000-0000000.tar.gz`` and ``000/test_0000-0000000.tar.gz``: both keep their folder.
    """
    parts = [Path(p).parts for p in paths]
    names = []
    for i, pp in enumerate(parts):
        depth = 1
        while depth < len(pp):
            suffix = pp[-depth:]
            if all(other[-depth:] != suffix for j, other in enumerate(parts) if j != i):
                break
            depth += 1
        names.append("/".join(pp[-depth:]))
    return names


def iter_clips(
    task: TaskSpec,
    split: Split,
    *,
    data_home: Path | None = None,
    report: SkipReport | None = None,
    download: bool = True,
    limit: int | None = None,
    sample_rate: int = SAMPLE_RATE,
) -> Iterator[Clip]:
    """Every readable clip of a task split, in shard order.

    Args:
        task: the task.
        split: "train" or "test".
        data_home: the data cache folder (see `evaluator.data.cache.data_home`).
        report: receives counts of clips, shards and skipped samples (created if None).
        download: fetch missing repo shards (never when ``HF_HUB_OFFLINE=1``).
        limit: stop after this many clips.
        sample_rate: output rate in Hz.

    Yields:
        `Clip`s with keys ``<shard name>/<member key>``.

    Raises:
        DataError: shard files are missing (raised before the first clip, listing them).
    """
    report = report if report is not None else SkipReport(task=task.id, split=split)
    if not report.task:
        report.task, report.split = task.id, split
    paths = resolve_shards(task, split, data_home=data_home, download=download)
    keys = task.keys(split)
    n = 0
    for name, path in zip(shard_names(paths), paths):
        for clip in read_shard(path, keys=keys, name=name, report=report, sample_rate=sample_rate):
            yield clip
            n += 1
            if limit is not None and n >= limit:
                return


def clips_by_key(
    task: TaskSpec, split: Split, wanted: Iterable[str], *, data_home: Path | None = None, download: bool = False
) -> dict[str, Clip]:
    """The clips with these keys, reading only the shard files they come from.

    A spot check re-encodes a handful of clips; decoding a whole task again to find them would cost as
    much audio I/O as the extraction itself.

    Raises:
        DataError: shard files are missing.
    """
    wanted = set(wanted)
    paths = resolve_shards(task, split, data_home=data_home, download=download)
    found: dict[str, Clip] = {}
    for name, path in zip(shard_names(paths), paths):
        if any(key.startswith(name + "/") for key in wanted):
            found.update((c.key, c) for c in read_shard(path, keys=task.keys(split), name=name) if c.key in wanted)
    return found


def read_shard(
    path: Path,
    *,
    keys: tuple[str, ...],
    name: str | None = None,
    report: SkipReport | None = None,
    sample_rate: int = SAMPLE_RATE,
) -> Iterator[Clip]:
    """Clips of one shard file; broken samples and a broken tail are counted in ``report``, not raised.

    Args:
        path: a .tar or .tar.gz webdataset shard.
        keys: label keys tried in order.
        name: the shard name used in clip keys (default: the file name).
        report: receives counts (created if None).
        sample_rate: output rate in Hz.

    Yields:
        `Clip`s in member order.
    """
    name = name or Path(path).name
    report = report if report is not None else SkipReport()
    report.shards += 1
    seen: set[str] = set()
    for key, members in _groups(Path(path), name, report):
        where = f"{name}/{key}"
        if key in seen:
            report.add(DUPLICATE_KEY, where, "key appears again later in the shard")
            continue
        seen.add(key)
        clip = _sample(where, members, keys, report, sample_rate)
        if clip is not None:
            report.clips += 1
            yield clip


def _sample(
    where: str, members: dict[str, bytes], keys: tuple[str, ...], report: SkipReport, sample_rate: int
) -> Clip | None:
    audio_ext = next((e for e in AUDIO_EXTENSIONS if e in members), None)
    label_ext = next((e for e in LABEL_EXTENSIONS if e in members), None)
    if audio_ext is None:
        if label_ext is not None:
            report.add(MISSING_AUDIO, where, f"members: {', '.join(sorted(members))}")
        return None  # neither audio nor label: not a sample (e.g. a README member)
    if label_ext is None:
        report.add(MISSING_LABEL, where, "no .json member")
        return None
    try:
        doc = _parse_json(members[label_ext])
    except ValueError as e:
        report.add(CORRUPT_MEMBER, f"{where}.{label_ext}", f"bad json ({e})")
        return None
    texts = extract_targets(doc, keys)
    if not texts:
        found = ", ".join(map(str, doc)) if isinstance(doc, dict) else type(doc).__name__
        report.add(MISSING_LABEL, where, f"none of {';'.join(keys)} in json (has: {found or 'nothing'})")
        return None
    targets, corrupt = usable_targets(texts)
    for text in corrupt:
        report.add(CORRUPT_TEXT, where, repr(text[:60]))
    if not targets:
        return None
    prompt = None
    if PROMPT_EXTENSION in members:
        try:
            prompt = members[PROMPT_EXTENSION].decode("utf-8-sig").strip()
        except UnicodeDecodeError:
            report.add(CORRUPT_MEMBER, f"{where}.{PROMPT_EXTENSION}", "not UTF-8")
            return None
    try:
        audio = load_audio(members[audio_ext], sample_rate=sample_rate, name=f"{where}.{audio_ext}")
    except DataError as e:
        report.add(UNREADABLE_AUDIO, f"{where}.{audio_ext}", str(e).split(": ", 1)[-1])
        return None
    if audio.size == 0:
        report.add(EMPTY_AUDIO, f"{where}.{audio_ext}", "0 samples")
        return None
    return Clip(key=where, audio=audio, targets=targets, prompt=prompt or None)


def _parse_json(data: bytes) -> Any:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError("not UTF-8") from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        lines = [ln for ln in text.splitlines() if ln.strip()]
        if len(lines) > 1:  # .jsonl: the first record
            try:
                return json.loads(lines[0])
            except json.JSONDecodeError:
                pass
        raise ValueError(str(e)) from e


def _groups(path: Path, name: str, report: SkipReport) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Consecutive members sharing a key, as {ext: bytes}; a broken stream ends the shard, counted once."""
    current_key: str | None = None
    current: dict[str, bytes] = {}
    try:
        with tarfile.open(path, mode="r|*") as tf:
            for member in tf:
                if member.isdir():
                    continue
                base = member.name.rsplit("/", 1)
                folder, file = (base[0] + "/", base[1]) if len(base) == 2 else ("", base[0])
                if "." not in file or file.startswith("."):
                    continue  # not a sample member (webdataset ignores these too)
                stem, ext = file.split(".", 1)
                key, ext = folder + stem, ext.lower()
                if key != current_key:
                    if current_key is not None:
                        yield current_key, current
                    current_key, current = key, {}
                if not member.isfile():
                    report.add(CORRUPT_MEMBER, f"{name}/{member.name}", "not a regular file")
                    continue
                if member.size > MAX_MEMBER_BYTES:
                    report.add(CORRUPT_MEMBER, f"{name}/{member.name}", f"{member.size} bytes (limit {MAX_MEMBER_BYTES})")
                    continue
                fh = tf.extractfile(member)
                current[ext] = fh.read() if fh is not None else b""
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, OSError) as e:
        detail = " ".join(str(e).split()) or type(e).__name__
        report.add(CORRUPT_SHARD, name, f"{detail} (kept what was read before)")
        # the group being read when the stream broke may lack members: yield it only if it has both
        if current_key is not None and any(e in current for e in AUDIO_EXTENSIONS) and any(
            e in current for e in LABEL_EXTENSIONS
        ):
            yield current_key, current
        return
    if current_key is not None:
        yield current_key, current


# ------------------------------------------------------------------------------------------- writing


def write_shard(path: Path, members: Iterable[tuple[str, bytes]], *, compress: bool | None = None) -> Path:
    """Write a webdataset shard byte-for-byte reproducibly (fixed mtimes, owners, modes; gzip mtime 0).

    Args:
        path: output file; ``.gz`` in the name means gzip unless ``compress`` says otherwise.
        members: (member name, bytes) in the order they go into the tar, e.g. ``("k1.wav", ...)``.
        compress: gzip the tar (default: by file name).

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    compress = path.name.endswith(".gz") if compress is None else compress
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for member_name, data in members:
            info = tarfile.TarInfo(member_name)
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tf.addfile(info, io.BytesIO(data))
    payload = raw.getvalue()
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as fh:
        if compress:
            with gzip.GzipFile(filename="", mode="wb", fileobj=fh, mtime=0, compresslevel=6) as gz:
                gz.write(payload)
        else:
            fh.write(payload)
    tmp.replace(path)
    return path
