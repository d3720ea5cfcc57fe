"""Digests of large files remembered by (path, size, mtime), and atomic writes."""

from __future__ import annotations

import json
import os
import stat

import pytest

from evaluator import fileio
from evaluator.fileio import DigestCache, sha256_file


def test_digests_are_read_once_until_the_file_changes(tmp_path, monkeypatch):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"x" * 1000)
    reads = []
    real = fileio.sha256_file
    monkeypatch.setattr(fileio, "sha256_file", lambda p: (reads.append(p), real(p))[1])
    cache = DigestCache(tmp_path / "out" / ".cache" / "sha256.json")
    first = cache.sha256(weights)
    assert first == sha256_file(weights) and len(reads) == 1
    assert DigestCache(cache.path).sha256(weights) == first and len(reads) == 1  # a new run: no re-read
    weights.write_bytes(b"y" * 1000)  # same size, new content and mtime
    os.utime(weights, ns=(1, 10**18))
    assert cache.sha256(weights) == sha256_file(weights) != first and len(reads) == 2


def test_a_broken_cache_is_only_a_miss(tmp_path):
    f = tmp_path / "f"
    f.write_text("hello")
    path = tmp_path / "sha256.json"
    for junk in ("{not json", "[1, 2]", json.dumps({str(f.resolve()): "bad"})):
        path.write_text(junk)
        assert DigestCache(path).sha256(f) == sha256_file(f)
    assert json.loads(path.read_text())[str(f.resolve())][-1] == sha256_file(f)


def test_an_unwritable_cache_still_gives_the_digest(tmp_path):
    f = tmp_path / "f"
    f.write_text("hello")
    blocker = tmp_path / "file-not-dir"
    blocker.write_text("")
    assert DigestCache(blocker / "sha256.json").sha256(f) == sha256_file(f)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_writes_get_the_mode_of_any_new_file(tmp_path, umask_022):
    """0666 less the umask, like run.log next to it: not mkstemp's 0600."""
    target = tmp_path / "run" / "results.json"
    fileio.atomic_write_text(target, "{}")
    assert _mode(target) == 0o644 and _mode(target.parent) == 0o755
    target.chmod(0o600)
    fileio.atomic_write_text(target, "{}")  # a rewrite gets the default mode again
    assert _mode(target) == 0o644
    os.umask(0o077)
    fileio.atomic_write_text(tmp_path / "private.json", "{}")
    assert _mode(tmp_path / "private.json") == 0o600  # the umask still decides
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left


def test_a_caller_can_ask_for_a_private_mode(tmp_path, umask_022):
    key = tmp_path / "signing.key"
    fileio.atomic_write_text(key, "secret", mode=0o600)
    assert _mode(key) == 0o600 and key.read_text() == "secret"
    fileio.atomic_write_text(tmp_path / "shared.txt", "x", mode=0o664)  # set exactly, umask aside
    assert _mode(tmp_path / "shared.txt") == 0o664


def test_cached_shard_digests_are_not_private(tmp_path, umask_022):
    from evaluator.data.cache import file_sha256

    shard = tmp_path / "shard.tar.gz"
    shard.write_bytes(b"x" * 100)
    assert file_sha256(shard, cache_dir=tmp_path / "cache") == sha256_file(shard)
    (entry,) = (tmp_path / "cache").iterdir()
    assert _mode(entry) == 0o644 and entry.read_text() == sha256_file(shard)
