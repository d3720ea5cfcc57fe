"""The data cache: repo shards under the data home, offline errors that list missing files, shard digests."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from evaluator.data import (
    data_home,
    file_sha256,
    get_track,
    iter_clips,
    resolve_shards,
    shard_digests,
    write_shard,
)
from evaluator.data.cache import DIGEST_DIR, shard_files
from evaluator.errors import DataError


def esc50_test_shard(home: Path) -> Path:
    buf = io.BytesIO()
    sf.write(buf, np.zeros(16000, dtype=np.float32) + 0.01, 44100, format="FLAC")
    members = [("1-100.flac", buf.getvalue()), ("1-100.json", json.dumps({"label": "dog"}).encode())]
    return write_shard(home / "ESC-50/test/esc50_fold_5_0000000.tar.gz", members)


class TestResolution:
    def test_offline_lists_missing_files(self, tmp_path, monkeypatch):
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        task = get_track("A").task("cremad")
        with pytest.raises(DataError) as e:
            resolve_shards(task, "train", data_home=tmp_path)
        msg = str(e.value)
        assert "6 of 6 train shard files missing" in msg and "HF_HUB_OFFLINE" in msg
        assert e.value.reasons == [
            f"missing: mispeech/xares_llm_data:CremaD/train/train_cremad_with_text_0000{i:02d}.tar.gz" for i in range(6)
        ]
        assert not any(tmp_path.iterdir())  # nothing written, nothing fetched

    def test_long_lists_are_cut(self, tmp_path, monkeypatch):
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        with pytest.raises(DataError) as e:
            resolve_shards(get_track("A").task("nsynth"), "train", data_home=tmp_path)
        assert len(e.value.reasons) == 21 and e.value.reasons[-1] == "... and 352 more"

    def test_partial_cache_names_only_the_missing(self, tmp_path, monkeypatch):
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        esc50_test_shard(tmp_path)
        task = get_track("A").task("esc-50")
        assert resolve_shards(task, "test", data_home=tmp_path) == [tmp_path / "ESC-50/test/esc50_fold_5_0000000.tar.gz"]
        clips = list(iter_clips(task, "test", data_home=tmp_path))
        assert [(c.key, c.targets) for c in clips] == [("esc50_fold_5_0000000.tar.gz/1-100", ("dog",))]
        status = shard_files(task, "train", data_home=tmp_path)
        assert status.describe() == "missing 4 of 4 shard files"
        assert shard_files(task, "test", data_home=tmp_path).describe() == "present (1 shard)"

    def test_unreachable_hub_fails_fast_with_the_list(self, tmp_path, monkeypatch):
        """The real huggingface_hub download path, pointed at a closed local port."""
        from huggingface_hub import constants

        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
        with pytest.raises(DataError) as e:
            resolve_shards(get_track("A").task("gtzan"), "test", data_home=tmp_path)
        assert "cannot download test shards from mispeech/xares_llm_data" in str(e.value)
        assert "unreachable" in str(e.value)
        assert e.value.reasons == ["missing: mispeech/xares_llm_data:GTZAN/test/gtzan_fold_9_0000000.tar.gz"]

    def test_hub_errors_become_data_errors(self, tmp_path, monkeypatch):
        """huggingface_hub really runs, against a local server that knows no repo (404 at once, no retries)."""
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        from huggingface_hub import constants

        class NotFound(BaseHTTPRequestHandler):
            def do_HEAD(self):
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_HEAD

            def log_message(self, *args):
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
            monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
            monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
            with pytest.raises(DataError) as e:
                resolve_shards(get_track("A").task("cremad"), "test", data_home=tmp_path)
        finally:
            server.shutdown()
            server.server_close()
        assert "cannot download test shards from mispeech/xares_llm_data" in str(e.value)
        assert len(e.value.reasons) == 2 and e.value.reasons[0].endswith("valid_cremad_with_text_000000.tar.gz")

    def test_download_disabled(self, tmp_path, monkeypatch):
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        with pytest.raises(DataError, match="download disabled"):
            resolve_shards(get_track("B").task("songdescriber"), "test", data_home=tmp_path, download=False)

    def test_data_home_default_and_env(self, tmp_path, monkeypatch):
        monkeypatch.delenv("XARES_DATA_HOME", raising=False)
        monkeypatch.chdir(tmp_path)
        assert data_home() == tmp_path / "xares_data"
        monkeypatch.setenv("XARES_DATA_HOME", str(tmp_path / "d"))
        assert data_home() == tmp_path / "d" and data_home(Path("/x")) == Path("/x")


class TestDigests:
    def test_digest_is_cached_and_follows_content(self, tmp_path):
        path = esc50_test_shard(tmp_path)
        task = get_track("A").task("esc-50")
        digests = shard_digests(task, "test", data_home=tmp_path, download=False)
        import hashlib

        assert digests == {"esc50_fold_5_0000000.tar.gz": hashlib.sha256(path.read_bytes()).hexdigest()}
        assert len(list((tmp_path / DIGEST_DIR).iterdir())) == 1
        path.write_bytes(path.read_bytes() + b"\0" * 512)  # new size: new digest
        os.utime(path, ns=(1, 1))
        assert file_sha256(path, cache_dir=tmp_path / DIGEST_DIR) == hashlib.sha256(path.read_bytes()).hexdigest()

    def test_cache_entry_is_used(self, tmp_path):
        path = tmp_path / "f.bin"
        path.write_bytes(b"abc")
        cache = tmp_path / "cache"
        real = file_sha256(path, cache_dir=cache)
        entry = next(cache.iterdir())
        entry.write_text("f" * 64)  # a planted digest proves the cache is read (same path, size, mtime)
        assert file_sha256(path, cache_dir=cache) == "f" * 64
        assert file_sha256(path) == real

    def test_unreadable_file(self, tmp_path):
        with pytest.raises(DataError, match="cannot read"):
            file_sha256(tmp_path / "missing.tar")
