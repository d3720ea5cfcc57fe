"""Packing, safe unpacking and verification of submission archives, with hostile tars built here."""

from __future__ import annotations

import gzip
import io
import json
import shutil
import subprocess
import tarfile

import pytest

from evaluator.errors import SubmissionError
from evaluator.submission.archive import UnpackLimits, pack, safe_unpack, verify_unpacked
from evaluator.submission.manifest import Manifest

MANIFEST = {
    "schema_version": 1,
    "name": "tiny",
    "team": "tests",
    "kind": "onnx",
    "sample_rate": 16000,
    "output_dim": 8,
    "frame_hop_ms": 20,
    "max_audio_seconds": 30,
    "output_dtype": "float32",
    "onnx": {"model": "model.onnx", "audio_input": "audio", "features_output": "features"},
    "files": [],
}


@pytest.fixture
def packed(tmp_path):
    stage = tmp_path / "stage"
    (stage / "source").mkdir(parents=True)
    (stage / "model.onnx").write_bytes(b"\x08\x01" * 500)
    (stage / "source" / "encoder.py").write_text("# source\n")
    (stage / "build_report.json").write_text("{}\n")
    out = tmp_path / "submission.tar"
    manifest = pack(stage, Manifest.from_dict(MANIFEST), out)
    return out, manifest


def hostile_tar(path, members, *, mode="w"):
    """Write a tar from (TarInfo, bytes or None) pairs."""
    with tarfile.open(path, mode) as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def member(name, data=b"x", **kw):
    info = tarfile.TarInfo(name)
    for k, v in kw.items():
        setattr(info, k, v)
    return info, (data if kw.get("type", tarfile.REGTYPE) == tarfile.REGTYPE else None)


def unpack_refused(tmp_path, archive, limits=None):
    dest = tmp_path / "dest"
    with pytest.raises(SubmissionError) as e:
        safe_unpack(archive, dest, limits or UnpackLimits())
    return " | ".join([str(e.value), *e.value.reasons])


class TestPack:
    def test_round_trip(self, tmp_path, packed):
        out, manifest = packed
        assert [f.path for f in manifest.files] == ["build_report.json", "model.onnx", "source/encoder.py"]
        dest = tmp_path / "dest"
        safe_unpack(out, dest)
        assert verify_unpacked(dest) == manifest
        if shutil.which("sha256sum"):  # SHA256SUMS is in coreutils format
            subprocess.run(["sha256sum", "--quiet", "-c", "SHA256SUMS"], cwd=dest, check=True)

    def test_reproducible(self, tmp_path, packed):
        out, manifest = packed
        again = tmp_path / "again.tar"
        pack(tmp_path / "stage", manifest, again)
        assert again.read_bytes() == out.read_bytes()

    def test_size_cap_leaves_nothing(self, tmp_path, packed):
        out = tmp_path / "capped.tar"
        with pytest.raises(SubmissionError, match="over the"):
            pack(tmp_path / "stage", packed[1], out, max_bytes=100)
        assert not out.exists() and not list(tmp_path.glob("*.partial"))

    def test_symlink_in_stage_refused(self, tmp_path, packed):
        (tmp_path / "stage" / "link").symlink_to("/etc/passwd")
        with pytest.raises(SubmissionError, match="symbolic link"):
            pack(tmp_path / "stage", packed[1], tmp_path / "x.tar")


class TestHostileArchives:
    @pytest.mark.parametrize(
        "entry, reason",
        [
            (member("../evil.txt"), "path traversal"),
            (member("ok/../../evil.txt"), "path traversal"),
            (member("/tmp/evil.txt"), "absolute path"),
            (member("link", type=tarfile.SYMTYPE, linkname="/etc/passwd"), "symbolic link"),
            (member("hard", type=tarfile.LNKTYPE, linkname="/etc/passwd"), "hard link"),
            (member("dev", type=tarfile.CHRTYPE, devmajor=1, devminor=3), "device"),
            (member("blk", type=tarfile.BLKTYPE, devmajor=8, devminor=0), "device"),
            (member("fifo", type=tarfile.FIFOTYPE), "FIFO"),
        ],
        ids=["dotdot", "nested-dotdot", "absolute", "symlink", "hardlink", "chardev", "blockdev", "fifo"],
    )
    def test_member_refused_with_reason(self, tmp_path, entry, reason):
        archive = hostile_tar(tmp_path / "h.tar", [member("manifest.json", b"{}"), entry])
        text = unpack_refused(tmp_path, archive)
        assert reason in text
        assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "dest").exists()

    def test_huge_member(self, tmp_path):
        archive = hostile_tar(tmp_path / "h.tar", [member("model.onnx", b"0" * 5000)])
        assert "cap per member" in unpack_refused(tmp_path, archive, UnpackLimits(max_member_bytes=4096))

    def test_too_much_in_total(self, tmp_path):
        archive = hostile_tar(tmp_path / "h.tar", [member(f"f{i}", b"0" * 3000) for i in range(3)])
        assert "unpacks to more than" in unpack_refused(tmp_path, archive, UnpackLimits(max_total_bytes=8000))

    def test_many_members(self, tmp_path):
        archive = hostile_tar(tmp_path / "h.tar", [member(f"f{i}") for i in range(12)])
        assert "more than 10 members" in unpack_refused(tmp_path, archive, UnpackLimits(max_members=10))

    def test_compression_bomb(self, tmp_path):
        archive = hostile_tar(tmp_path / "bomb.tar.gz", [member("zeros", b"\0" * (4 << 20))], mode="w:gz")
        assert archive.stat().st_size < 64 << 10
        limits = UnpackLimits(ratio_floor_bytes=1 << 20, max_ratio=50)
        assert "compression bomb" in unpack_refused(tmp_path, archive, limits)

    def test_duplicate_member(self, tmp_path):
        archive = hostile_tar(tmp_path / "h.tar", [member("model.onnx", b"a"), member("./model.onnx", b"b")])
        assert "appears twice" in unpack_refused(tmp_path, archive)

    def test_not_a_tar(self, tmp_path):
        bad = tmp_path / "junk.tar"
        bad.write_bytes(b"definitely not a tar archive" * 100)
        assert "not a readable tar" in unpack_refused(tmp_path, bad)

    def test_truncated_tar(self, tmp_path, packed):
        cut = tmp_path / "cut.tar.gz"
        cut.write_bytes(gzip.compress(packed[0].read_bytes())[:700])
        assert "tar" in unpack_refused(tmp_path, cut)

    def test_empty_tar(self, tmp_path):
        assert "empty" in unpack_refused(tmp_path, hostile_tar(tmp_path / "e.tar", []))


class TestVerify:
    def unpack(self, tmp_path, packed):
        dest = tmp_path / "dest"
        safe_unpack(packed[0], dest)
        return dest

    def refused(self, dest):
        with pytest.raises(SubmissionError) as e:
            verify_unpacked(dest)
        return " | ".join([str(e.value), *e.value.reasons])

    def test_tampered_payload(self, tmp_path, packed):
        dest = self.unpack(tmp_path, packed)
        (dest / "model.onnx").write_bytes(b"\x08\x02" * 500)  # same size, other bytes
        text = self.refused(dest)
        assert "model.onnx: sha256" in text and "does not match SHA256SUMS" in text

    def test_extra_and_missing_files(self, tmp_path, packed):
        dest = self.unpack(tmp_path, packed)
        (dest / "extra.bin").write_bytes(b"?")
        (dest / "source" / "encoder.py").unlink()
        text = self.refused(dest)
        assert "extra.bin: in the archive but not listed" in text
        assert "source/encoder.py: listed in manifest files but missing" in text

    def test_missing_manifest(self, tmp_path, packed):
        dest = self.unpack(tmp_path, packed)
        (dest / "manifest.json").unlink()
        assert "no manifest.json" in self.refused(dest)

    def test_manifest_in_a_subfolder(self, tmp_path):
        (tmp_path / "dest" / "enc").mkdir(parents=True)
        (tmp_path / "dest" / "enc" / "manifest.json").write_text("{}")
        assert "pack the folder's contents" in self.refused(tmp_path / "dest")

    def test_invalid_manifest(self, tmp_path, packed):
        dest = self.unpack(tmp_path, packed)
        doc = json.loads((dest / "manifest.json").read_text())
        doc["output_dim"] = "eighty"
        del doc["team"]
        (dest / "manifest.json").write_text(json.dumps(doc))
        text = self.refused(dest)
        assert "does not match submission.schema.json" in text and "output_dim" in text and "team" in text

    def test_manifest_not_json(self, tmp_path, packed):
        dest = self.unpack(tmp_path, packed)
        (dest / "manifest.json").write_text("{nope")
        assert "not valid JSON" in self.refused(dest)

    def test_missing_checksums(self, tmp_path, packed):
        dest = self.unpack(tmp_path, packed)
        (dest / "SHA256SUMS").unlink()
        assert "no SHA256SUMS" in self.refused(dest)

    def test_malformed_checksums(self, tmp_path, packed):
        dest = self.unpack(tmp_path, packed)
        (dest / "SHA256SUMS").write_text("garbage line\n")
        assert "is not '<sha256>  <path>'" in self.refused(dest)
