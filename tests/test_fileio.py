"""Digests of large files remembered by (path, size, mtime), and atomic writes."""

from __future__ import annotations

import json
import os

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
