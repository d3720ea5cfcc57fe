"""The feature store: every clip's encoder output, computed once per submission and kept on disk.

The frozen encoder only needs to run once per clip; training and generation then read the stored
features (memory-mapped) and the clip's targets, and never touch audio again. The layout follows
hear-eval-kit's embedding cache: one directory per (submission, task split, extraction settings),
named by a hash of exactly those things, with a done marker written last::

    <root>/<key digest>/
      key.json                what went into the key (submission sha256, data digests, dtype, ...)
      shards/000000.npy       features of many clips stacked along time, [sum T_i, D], float16
      shards/000000.json      that shard's part of the index (clip key -> offset, frames, targets)
      index.json              the merged index, written when every clip is in
      profile.json            wall time, audio-seconds per second, bytes, peak memory, encoder calls
      DONE                    written last; a directory without it is incomplete

A shard counts once its ``.json`` is in place (the ``.npy`` is renamed into place before it), so an
interrupted extraction keeps every finished shard and redoes only the rest. Many tasks and splits of
one or several submissions share one root: each gets its own key directory.

Example::

    store = FeatureStore.open(root, StoreKey(submission_sha256=..., data_digests=(...), task="esc50",
                                              split="train", window_seconds=30.0))
    ds = store.dataset(prompt="Classify the environmental sound.")
    ds.features(0)  # [T, D] float16, memory-mapped
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from evaluator.data.specs import Prompt
from evaluator.errors import ConfigError, DataError, SubmissionError
from evaluator.fileio import atomic_write_text, sha256_file

log = logging.getLogger(__name__)

STORE_VERSION = 2  # v2: XARES-LLM targets (corrupt-text filter, "" kept), peak-normalised audio, prompts. Bump when the layout or what is stored changes: every old key becomes a miss
DTYPES = ("float16", "bfloat16", "float32")  # bfloat16: float32's range in half the bytes, 8-bit mantissa
DEFAULT_SHARD_BYTES = 256 << 20  # ~256 MiB of features per shard file
KEY_NAME = "key.json"
INDEX_NAME = "index.json"
PROFILE_NAME = "profile.json"
DONE_NAME = "DONE"
SHARD_DIR = "shards"
DIGEST_CHARS = 32  # hex characters of the key digest used as the directory name (128 bits)
FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65504


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype of a store dtype name (bfloat16 comes from ml_dtypes, onnx's own dependency)."""
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


class FeatureRangeError(SubmissionError):
    """Features beyond the store dtype's range; the runner redoes the split in float32."""

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class StoreKey:
    """Everything that changes the stored features or targets; its hash names the store directory.

    Batch sizes and shard sizes are not part of it: they change how the work is cut, not the result.
    """

    # what was encoded
    submission_sha256: str  # sha256 of submission.tar
    data_digests: tuple[str, ...]  # sha256 of every data shard the clips come from (order-free)
    task: str  # task name (a label: the same shards under two tasks are two stores)
    split: str  # "train" | "eval" | any label
    # how
    dtype: str = "float16"  # storage dtype of the features
    window_seconds: float | None = None  # longer clips are encoded in windows of at most this (s)
    crop_seconds: float | None = None  # keep only the first N seconds of every clip; None = all
    settings: tuple[tuple[str, str], ...] = ()  # anything else that changes features/targets
    store_version: int = STORE_VERSION

    def __post_init__(self):
        if not _SHA256.match(self.submission_sha256):
            raise ConfigError(f"submission_sha256 must be 64 lower-case hex digits, got {self.submission_sha256!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"feature dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        for name in ("window_seconds", "crop_seconds"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"{name} must be positive or None, got {value!r}")
        if not self.task or not self.split:
            raise ConfigError("a feature store key needs a task and a split name")
        # canonical forms, so equal settings always hash equal
        object.__setattr__(self, "data_digests", tuple(sorted(str(d) for d in self.data_digests)))
        object.__setattr__(self, "settings", tuple(sorted((str(k), str(v)) for k, v in self.settings)))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["data_digests"] = list(self.data_digests)
        d["settings"] = {k: v for k, v in self.settings}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> StoreKey:
        d = dict(d)
        d["data_digests"] = tuple(d.get("data_digests", ()))
        d["settings"] = tuple(dict(d.get("settings", {})).items())
        return cls(**d)

    @classmethod
    def for_shards(cls, submission_sha256: str, shard_digests: dict[str, str], **fields) -> StoreKey:
        """The key of one task split's features: ``shard_digests`` maps shard name -> content sha256."""
        return cls(submission_sha256=submission_sha256,
                   data_digests=tuple(f"{name}={d}" for name, d in shard_digests.items()), **fields)

    @property
    def digest(self) -> str:
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()


@dataclass(frozen=True)
class Entry:
    """Where one clip's features live, and what the decoder must learn to say about it."""

    key: str
    ordinal: int  # position of the clip in the data order (datasets iterate in this order)
    shard: str  # shard file stem, e.g. "000003"
    offset: int  # first row in the shard
    frames: int  # T
    seconds: float  # audio duration that was encoded
    targets: tuple[str, ...] = ()
    prompt: str | None = None  # the clip's own prompt (used when the task's prompt is empty)


@dataclass(frozen=True)
class Failure:
    """A clip the encoder could not encode; kept so it is scored as wrong, never silently dropped."""

    key: str
    ordinal: int
    seconds: float
    reason: str
    targets: tuple[str, ...] = ()
    prompt: str | None = None


@dataclass
class PendingClip:
    """A clip's finished features waiting to be written in the next shard."""

    key: str
    ordinal: int
    features: np.ndarray  # [T, D]
    seconds: float
    targets: tuple[str, ...] = ()
    prompt: str | None = None


@dataclass(frozen=True)
class ShardInfo:
    name: str
    sha256: str
    bytes: int
    frames: int


@dataclass
class _Contents:
    entries: dict[str, Entry] = field(default_factory=dict)
    failures: dict[str, Failure] = field(default_factory=dict)
    shards: dict[str, ShardInfo] = field(default_factory=dict)
    dim: int | None = None


class FeatureStore:
    """One key directory. Create or reopen with `FeatureStore.open`; read a finished one with `load`."""

    def __init__(self, path: Path, key: StoreKey):
        self.path = Path(path)
        self.key = key
        self._contents: _Contents | None = None

    # ---- opening -------------------------------------------------------------------------
    @classmethod
    def open(cls, root: Path, key: StoreKey) -> FeatureStore:
        """Create the key directory under ``root`` or reopen it to resume or reuse.

        Leftovers of an interrupted write (temp files, a shard array without its index part) are
        removed; finished shards are kept.

        Args:
            root: the store root shared by every submission, task and split.
            key: what the features depend on.

        Returns:
            The store; `complete` tells whether it already holds every clip.

        Raises:
            DataError: the directory holds a different key.json (a hash collision or a hand edit).
        """
        path = Path(root) / key.digest[:DIGEST_CHARS]
        (path / SHARD_DIR).mkdir(parents=True, exist_ok=True)
        key_file = path / KEY_NAME
        if key_file.exists():
            found = _read_json(key_file)
            if found != key.to_dict():
                raise DataError(
                    f"feature store {path} holds a different key.json than expected",
                    reasons=[f"expected {key.to_dict()}", f"found {found}", "delete the directory to rebuild it"],
                )
        else:
            atomic_write_text(key_file, json.dumps(key.to_dict(), indent=2, sort_keys=True))
        store = cls(path, key)
        if not store.complete:
            store._clean_partial()
        return store

    @classmethod
    def load(cls, path: Path) -> FeatureStore:
        """Open an existing key directory (e.g. for training), complete or not, without writing."""
        path = Path(path)
        key_file = path / KEY_NAME
        if not key_file.exists():
            raise DataError(f"{path} is not a feature store (no {KEY_NAME})")
        return cls(path, StoreKey.from_dict(_read_json(key_file)))

    @staticmethod
    def scan(root: Path) -> list[FeatureStore]:
        """Every store directory under ``root`` (complete or not), sorted by task, split and path."""
        found = []
        for key_file in sorted(Path(root).glob(f"*/{KEY_NAME}")):
            try:
                found.append(FeatureStore.load(key_file.parent))
            except (DataError, TypeError, ValueError, ConfigError) as e:
                log.warning("skipping %s: %s", key_file.parent, e)
        return sorted(found, key=lambda s: (s.key.task, s.key.split, str(s.path)))

    @classmethod
    def find(cls, root: Path, key: StoreKey) -> FeatureStore | None:
        """The complete store for ``key`` under ``root``, or None (nothing is created)."""
        path = Path(root) / key.digest[:DIGEST_CHARS]
        if not (path / DONE_NAME).exists():
            return None
        store = cls.load(path)
        return store if store.key == key else None

    # ---- state ---------------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        return (self.path / DONE_NAME).exists()

    @property
    def profile(self) -> dict:
        p = self.path / PROFILE_NAME
        return _read_json(p) if p.exists() else {}

    def _load_contents(self) -> _Contents:
        if self._contents is not None:
            return self._contents
        c = _Contents()
        if self.complete:
            index = _read_json(self.path / INDEX_NAME)
            c.dim = index["dim"]
            for s in index["shards"]:
                c.shards[s["name"]] = ShardInfo(**s)
            parts = [index]
        else:
            parts = []
            for part_file in sorted((self.path / SHARD_DIR).glob("*.json")):
                part = _read_json(part_file)
                c.shards[part["shard"]["name"]] = ShardInfo(**part["shard"])
                c.dim = part["dim"] if c.dim is None else c.dim
                parts.append(part)
        for part in parts:
            for e in part["entries"]:
                c.entries[e["key"]] = Entry(**{**e, "targets": tuple(e["targets"])})
            for f in part["failures"]:
                c.failures[f["key"]] = Failure(**{**f, "targets": tuple(f["targets"])})
        self._contents = c
        return c

    @property
    def entries(self) -> dict[str, Entry]:
        """Clip key -> Entry, for every stored clip (finished shards only while incomplete)."""
        return self._load_contents().entries

    @property
    def failures(self) -> dict[str, Failure]:
        """Clip key -> Failure, for clips the encoder could not encode."""
        return self._load_contents().failures

    @property
    def dim(self) -> int | None:
        return self._load_contents().dim

    def done_keys(self) -> set[str]:
        """Clip keys already handled (stored or failed): a resumed extraction skips these."""
        c = self._load_contents()
        return set(c.entries) | set(c.failures)

    @property
    def bytes_stored(self) -> int:
        """Bytes of feature shards on disk (index and profile files are not counted)."""
        return sum(s.bytes for s in self._load_contents().shards.values())

    @property
    def audio_seconds(self) -> float:
        return float(sum(e.seconds for e in self.entries.values()))

    # ---- writing -------------------------------------------------------------------------
    def _clean_partial(self) -> None:
        """Drop temp files and shard arrays whose index part never landed (an interrupted write)."""
        shard_dir = self.path / SHARD_DIR
        for tmp in list(self.path.glob("*.tmp")) + list(shard_dir.glob("*.tmp")):
            tmp.unlink(missing_ok=True)
        for npy in shard_dir.glob("*.npy"):
            part = npy.with_suffix(".json")
            if not part.exists():
                log.info("removing unfinished shard %s", npy)
                npy.unlink()
                continue
            info = _read_json(part)["shard"]
            if npy.stat().st_size != info["bytes"]:
                log.warning("shard %s has the wrong size; redoing its clips", npy)
                npy.unlink()
                part.unlink()
        for part in shard_dir.glob("*.json"):
            if not part.with_suffix(".npy").exists():
                part.unlink()
        for name in (INDEX_NAME, PROFILE_NAME):
            (self.path / name).unlink(missing_ok=True)
        self._contents = None

    def write_shard(self, clips: Sequence[PendingClip], failures: Sequence[Failure] = ()) -> ShardInfo | None:
        """Write finished clips as one new shard: array first, then its index part (both atomic).

        Args:
            clips: validated features, each [T, D] with the same D; cast to the key's dtype here.
            failures: clips that could not be encoded, recorded with the same shard.

        Returns:
            The shard's info, or None when there was nothing to write.

        Raises:
            SubmissionError: features do not fit the store's dtype (beyond float16's range).
        """
        if not clips and not failures:
            return None
        if self.complete:
            raise RuntimeError(f"{self.path} is complete; open a new key to write more")
        c = self._load_contents()
        dims = {p.features.shape[1] for p in clips}
        if c.dim is not None:
            dims.add(c.dim)
        assert len(dims) <= 1, f"mixed feature dims {dims}"  # the extraction validated D already
        dim = dims.pop() if dims else (c.dim or 0)
        name = f"{len(c.shards):06d}"
        while (self.path / SHARD_DIR / f"{name}.json").exists():  # never overwrite a finished shard
            name = f"{int(name) + 1:06d}"
        dtype = numpy_dtype(self.key.dtype)
        if clips:
            stacked = np.concatenate([p.features for p in clips], axis=0)
        else:
            stacked = np.zeros((0, dim), dtype=np.float32)
        for p in clips:
            if p.features.dtype != dtype:
                self.cast(p.key, p.features)  # refuses values the store dtype cannot hold
        stacked = np.ascontiguousarray(stacked, dtype=dtype)
        npy = self.path / SHARD_DIR / f"{name}.npy"
        sha = _atomic_write_npy(npy, stacked)
        info = ShardInfo(name=name, sha256=sha, bytes=npy.stat().st_size, frames=int(stacked.shape[0]))
        entries, offset = [], 0
        for p in clips:
            frames = int(p.features.shape[0])
            entries.append(
                Entry(p.key, p.ordinal, name, offset, frames, float(p.seconds), tuple(p.targets), p.prompt)
            )
            offset += frames
        part = {
            "version": STORE_VERSION,
            "dim": dim,
            "dtype": self.key.dtype,
            "shard": asdict(info),
            "entries": [asdict(e) for e in entries],
            "failures": [asdict(f) for f in failures],
        }
        atomic_write_text(npy.with_suffix(".json"), json.dumps(part), durable=True)
        c.shards[name] = info
        c.dim = dim if c.dim is None else c.dim
        for e in entries:
            c.entries[e.key] = e
        for f in failures:
            c.failures[f.key] = f
        return info

    def cast(self, clip_key: str, features: np.ndarray) -> np.ndarray:
        """``features`` in the store dtype (halves what waits in memory for the next shard).

        Raises:
            FeatureRangeError: values beyond float16's range (they would be stored as inf).
        """
        dtype = numpy_dtype(self.key.dtype)
        if dtype == np.float16 and features.dtype != np.float16 and features.size:
            peak = float(np.abs(features).max())
            if peak > FLOAT16_MAX:
                raise FeatureRangeError(
                    f"features of clip {clip_key} reach {peak:.4g}, beyond float16's range ({FLOAT16_MAX:g})",
                    reasons=["store them as float32 or bfloat16 (--feature-dtype), or rescale the encoder's output"],
                )
        return features.astype(dtype, copy=False)

    def finalize(self, profile: dict) -> None:
        """Write the merged index, the profile, then the done marker (last)."""
        c = self._load_contents()
        index = {
            "version": STORE_VERSION,
            "dim": c.dim,
            "dtype": self.key.dtype,
            "clips": len(c.entries),
            "failed": len(c.failures),
            "shards": [asdict(s) for _, s in sorted(c.shards.items())],
            "entries": [asdict(e) for e in sorted(c.entries.values(), key=lambda e: e.ordinal)],
            "failures": [asdict(f) for f in sorted(c.failures.values(), key=lambda f: f.ordinal)],
        }
        atomic_write_text(self.path / INDEX_NAME, json.dumps(index), durable=True)
        atomic_write_text(self.path / PROFILE_NAME, json.dumps(profile, indent=2, sort_keys=True))
        atomic_write_text(self.path / DONE_NAME, "", durable=True)
        _fsync_dir(self.path)

    def clear(self) -> None:
        """Delete everything in this key directory and start empty (keeps key.json)."""
        shutil.rmtree(self.path / SHARD_DIR, ignore_errors=True)
        for name in (DONE_NAME, INDEX_NAME, PROFILE_NAME):
            (self.path / name).unlink(missing_ok=True)
        (self.path / SHARD_DIR).mkdir(parents=True, exist_ok=True)
        self._contents = None

    # ---- reading -------------------------------------------------------------------------
    def shard_array(self, name: str) -> np.ndarray:
        """A shard memory-mapped read-only, [frames, D]."""
        arr = np.load(self.path / SHARD_DIR / f"{name}.npy", mmap_mode="r")
        if arr.dtype.kind == "V":  # .npy has no name for bfloat16: it reads back as raw 2-byte records
            arr = arr.view(numpy_dtype(self.key.dtype))
        return arr

    def features(self, key: str) -> np.ndarray:
        """The stored [T, D] features of one clip (a fresh in-memory copy)."""
        e = self.entries.get(key)
        if e is None:
            raise KeyError(f"clip {key!r} is not in feature store {self.path}")
        return np.array(self.shard_array(e.shard)[e.offset : e.offset + e.frames])

    def verify(self) -> list[str]:
        """Re-hash every shard; returns one line per corrupt or missing shard (empty when intact)."""
        problems = []
        for s in self._load_contents().shards.values():
            path = self.path / SHARD_DIR / f"{s.name}.npy"
            if not path.exists():
                problems.append(f"{path}: missing")
            elif sha256_file(path) != s.sha256:
                problems.append(f"{path}: sha256 differs from the index")
        return problems

    def dataset(self, *, prompt: Prompt, task: str | None = None) -> StoredFeatureDataset:
        """The finished store as a `FeatureDataset` for training and generation."""
        if not self.complete:
            raise DataError(f"feature store {self.path} is incomplete (no {DONE_NAME}); rerun the extraction")
        return StoredFeatureDataset(self, prompt=prompt, task=task)


@dataclass
class ArrayDataset:
    """A `FeatureDataset` held in memory, for features computed elsewhere (tests, benchmarks, notebooks)."""

    task: str
    prompt: Prompt  # one prompt, or a list to draw from per sample
    arrays: list[np.ndarray]  # one [T, D] array per clip
    labels: list[tuple[str, ...]]  # the clip's reference texts
    keys: list[str] | None = None  # sample ids; default "<task>/<index>"
    prompts: list[str | None] | None = None  # per-clip prompts (used when ``prompt`` is "")
    durations: list[float] | None = None  # clip seconds; default: frames / ``frames_per_second``
    frames_per_second: float = 50.0

    def __post_init__(self):
        if len(self.arrays) != len(self.labels) or any(
                x is not None and len(x) != len(self.arrays) for x in (self.keys, self.prompts, self.durations)):
            raise ValueError("arrays, labels, keys, prompts and durations must have one entry per clip")

    def __len__(self) -> int:
        return len(self.arrays)

    def key(self, i: int) -> str:
        return self.keys[i] if self.keys is not None else f"{self.task}/{i:05d}"

    def features(self, i: int) -> np.ndarray:
        return self.arrays[i]

    def targets(self, i: int) -> tuple[str, ...]:
        return self.labels[i]

    def sample_prompt(self, i: int) -> str | None:
        return self.prompts[i] if self.prompts is not None else None

    def seconds(self, i: int) -> float:
        return self.durations[i] if self.durations is not None else len(self.arrays[i]) / self.frames_per_second


class StoredFeatureDataset:
    """`FeatureDataset` over a finished store: clips in data order, features memory-mapped.

    Clips the encoder failed on are not items (there are no features to feed), but they are listed in
    `failed` (key -> Failure, with targets) so generation can score them as wrong.
    """

    def __init__(self, store: FeatureStore, *, prompt: Prompt, task: str | None = None):
        self.store = store
        self.task = task or store.key.task
        self.prompt = prompt
        self._entries = sorted(store.entries.values(), key=lambda e: e.ordinal)
        self.failed = dict(store.failures)
        self.dim = store.dim
        self._maps: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[int]:
        return iter(range(len(self)))

    def _entry(self, i: int) -> Entry:
        if not -len(self._entries) <= i < len(self._entries):
            raise IndexError(f"item {i} out of range for {len(self._entries)} clips")
        return self._entries[i]

    def key(self, i: int) -> str:
        return self._entry(i).key

    def features(self, i: int) -> np.ndarray:
        """[T, D] in the store's dtype; a read-only view of the memory-mapped shard."""
        e = self._entry(i)
        arr = self._maps.get(e.shard)
        if arr is None:
            arr = self._maps[e.shard] = self.store.shard_array(e.shard)
        return arr[e.offset : e.offset + e.frames]

    def targets(self, i: int) -> tuple[str, ...]:
        return self._entry(i).targets

    def sample_prompt(self, i: int) -> str | None:
        return self._entry(i).prompt

    def seconds(self, i: int) -> float:
        return self._entry(i).seconds

    def __getstate__(self):  # DataLoader workers reopen the maps themselves
        state = dict(self.__dict__)
        state["_maps"] = {}
        return state


# ---- small file helpers ----------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {path}: {e}; delete the store directory to rebuild it") from e


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)




def _atomic_write_npy(path: Path, array: np.ndarray) -> str:
    """Write ``array`` as .npy via a temp file + rename; returns the file's sha256."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return sha256_file(path)




