"""The shard reader and audio decoding on shards we write ourselves, broken ones included."""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from evaluator.data import (
    Clip,
    SkipReport,
    extract_targets,
    is_corrupt_text,
    load_audio,
    read_shard,
    shard_names,
    write_shard,
)
from evaluator.data.xares_yaml import label_keys
from evaluator.errors import DataError

KEYS = label_keys("label;labels")


def audio_bytes(seconds=0.5, sr=16000, channels=1, fmt="WAV", subtype="PCM_16", freq=440.0) -> bytes:
    t = np.arange(int(seconds * sr)) / sr
    wave = 0.3 * np.sin(2 * np.pi * freq * t).astype(np.float32)
    if channels > 1:
        wave = np.stack([wave] * channels, axis=1)
    buf = io.BytesIO()
    sf.write(buf, wave, sr, format=fmt, subtype=subtype)
    return buf.getvalue()


def nan_wav() -> bytes:
    wave = np.zeros(800, dtype=np.float32)
    wave[100] = np.nan
    buf = io.BytesIO()
    sf.write(buf, wave, 16000, format="WAV", subtype="FLOAT")
    return buf.getvalue()


def label(**kw) -> bytes:
    return json.dumps(kw).encode()


def read(path: Path, keys=KEYS) -> tuple[list[Clip], SkipReport]:
    report = SkipReport(task="t", split="test")
    return list(read_shard(path, keys=keys, report=report)), report


class TestGoodShards:
    def test_tar_and_tar_gz(self, tmp_path):
        members = [("a.wav", audio_bytes()), ("a.json", label(label="dog")), ("b.flac", audio_bytes(fmt="FLAC")),
                   ("b.json", label(labels="cat"))]
        for name in ("s.tar", "s.tar.gz"):
            clips, report = read(write_shard(tmp_path / name, members))
            assert [c.key for c in clips] == [f"{name}/a", f"{name}/b"]
            assert [c.targets for c in clips] == [("dog",), ("cat",)]
            assert report.clips == 2 and report.skipped == 0
            assert clips[0].audio.dtype == np.float32 and clips[0].audio.shape == (8000,)

    def test_formats_resampled_to_mono_16k(self, tmp_path):
        cases = {
            "mp3": audio_bytes(1.0, 44100, 2, "MP3", "MPEG_LAYER_III"),
            "opus": audio_bytes(1.0, 48000, 1, "OGG", "OPUS"),
            "ogg": audio_bytes(1.0, 22050, 2, "OGG", "VORBIS"),
            "flac": audio_bytes(1.0, 8000, 2, "FLAC"),
        }
        members = []
        for ext, data in cases.items():
            members += [(f"k_{ext}.{ext}", data), (f"k_{ext}.json", label(label=ext))]
        clips, report = read(write_shard(tmp_path / "f.tar.gz", members))
        assert report.skipped == 0 and len(clips) == 4
        for c in clips:
            assert c.audio.ndim == 1 and c.audio.dtype == np.float32
            assert abs(len(c.audio) - 16000) < 1200, (c.key, len(c.audio))  # codec priming/padding aside
            spectrum = np.abs(np.fft.rfft(c.audio[2000:14000]))
            assert abs(np.argmax(spectrum) * 16000 / 12000 - 440) < 10  # still a 440 Hz tone at 16 kHz

    def test_label_rules(self):
        # XARES-LLM's text_from_json: the first key holding a string (even ""), a number or a non-empty list
        keys = label_keys("text;caption;captions;label;labels")
        assert extract_targets({"captions": ["a dog", "", "a barking dog"]}, keys) == ("a dog", "", "a barking dog")
        assert extract_targets({"num_speakers": 3}, label_keys("num_speakers")) == ("3",)
        assert extract_targets({"num_speakers": 0}, label_keys("num_speakers")) == ("0",)
        assert extract_targets({"label": "", "labels": "b;c"}, keys) == ("",)  # "" is a label: no fallback
        assert extract_targets({"label": [], "labels": "b;c"}, keys) == ("b;c",)  # an empty list is none
        assert extract_targets({"label": None, "labels": 2.5}, keys) == ("2.5",)
        assert extract_targets({"trans": "hi", "text": "other"}, label_keys("trans")) == ("hi",)
        assert extract_targets({"caption": "fallback"}, label_keys("long")) == ("fallback",)  # default keys
        assert extract_targets({"label": {"x": 1}}, keys) == ()
        assert extract_targets(["not", "a", "dict"], keys) == ()

    @pytest.mark.parametrize("text, corrupt", [
        ("", False),  # an empty label is valid
        ("a dog barks", False),
        ("7", False),
        ("!!!???", True),  # more than half not alphanumeric
        ("oh [__]", True),  # 3 of 7 alphanumeric: 4/7 > 0.5
        ("a, b", False),  # 2 of 4 alphanumeric: exactly half is fine
        (" ", True),
        ("A\u0333\u0366B\u0333\u0366C", True),  # 4 combining marks
        ("A\u0333\u0366BC", False),  # 2 marks, 3 of 5 alphanumeric
        ("aaaaaabbbbbb", True),  # longer than 10 with fewer than 4 distinct characters
        ("aaaaabbbbb", False),  # 10 characters: not "longer than 10"
        ("abcd" * 5, False),
    ])
    def test_corrupt_text_filter(self, text, corrupt):
        assert is_corrupt_text(text) is corrupt

    def test_corrupt_texts_leave_the_sample_list(self, tmp_path):
        members = [
            ("a.wav", audio_bytes()), ("a.json", label(captions=["a dog barks", "!!!???", "rain"])),
            ("b.wav", audio_bytes()), ("b.json", label(label="[__] [__]")),  # its only text is corrupt
            ("c.wav", audio_bytes()), ("c.json", label(label="")),  # an empty label stays a sample
        ]
        clips, report = read(write_shard(tmp_path / "c.tar", members), keys=label_keys("label;captions"))
        assert [(c.key, c.targets) for c in clips] == [("c.tar/a", ("a dog barks", "rain")), ("c.tar/c", ("",))]
        assert report.counts["corrupt text"] == 2 and report.clips == 2
        assert "2 corrupt text" in report.summary()
        assert any("[__]" in ex for ex in report.examples["corrupt text"])

    def test_per_sample_prompt_member(self, tmp_path):
        members = [("a.wav", audio_bytes()), ("a.json", label(label="x")), ("a.prompt", b"Name the sound.\n"),
                   ("b.wav", audio_bytes()), ("b.json", label(label="y")),
                   ("c.wav", audio_bytes()), ("c.json", label(label="z")), ("c.prompt", b"\xff\xfe bad")]
        clips, report = read(write_shard(tmp_path / "p.tar", members))
        assert [(c.key, c.prompt) for c in clips] == [("p.tar/a", "Name the sound."), ("p.tar/b", None)]
        assert report.counts["corrupt member"] == 1 and "c.prompt" in report.examples["corrupt member"][0]

    def test_shard_names_unique(self):
        paths = [Path("/d/0M0/test_0000-0000000.tar.gz"), Path("/d/000/test_0000-0000000.tar.gz"), Path("/d/x.tar")]
        assert shard_names(paths) == ["0M0/test_0000-0000000.tar.gz", "000/test_0000-0000000.tar.gz", "x.tar"]


class TestBrokenSamples:
    def test_each_broken_member_is_counted_and_skipped(self, tmp_path):
        good = audio_bytes()
        members = [
            ("ok1.wav", good), ("ok1.json", label(label="yes")),
            ("badjson.wav", good), ("badjson.json", b"{not json"),
            ("trunc.wav", good[:30]), ("trunc.json", label(label="x")),
            ("zero.wav", audio_bytes(0.0)), ("zero.json", label(label="x")),
            ("nolabel.wav", good), ("nolabel.json", label(other="x")),
            ("garbage.wav", b"\x00\x01garbage" * 50), ("garbage.json", label(label="x")),
            ("nojson.wav", good),
            ("noaudio.json", label(label="x")), ("noaudio.txt", b"hello"),
            ("nan.wav", nan_wav()),
            ("nan.json", label(label="x")),
            ("ok2.wav", good), ("ok2.json", label(labels=["a", "b"])),
            ("ok1.wav", good), ("ok1.json", label(label="dup")),
        ]
        clips, report = read(write_shard(tmp_path / "broken.tar.gz", members))
        assert [c.key for c in clips] == ["broken.tar.gz/ok1", "broken.tar.gz/ok2"]
        assert clips[1].targets == ("a", "b")
        assert dict(report.counts) == {
            "corrupt member": 1, "unreadable audio": 3, "empty audio": 1, "missing label": 2,
            "missing audio": 1, "duplicate key": 1,
        }
        assert report.clips == 2 and report.skipped == 9
        summary = report.summary()
        assert summary.startswith("t/test: 2 clips from 1 shard; skipped 9 (")
        assert "1 corrupt member" in summary and "3 unreadable audio" in summary
        assert any("badjson.json" in line for line in report.lines())
        assert report.to_dict()["counts"]["missing label"] == 2

    def test_truncated_gzip_keeps_what_was_read(self, tmp_path):
        members = []
        for i in range(20):
            members += [(f"k{i:02d}.wav", audio_bytes(0.3, freq=300 + 10 * i)), (f"k{i:02d}.json", label(label=str(i)))]
        path = write_shard(tmp_path / "t.tar.gz", members)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        clips, report = read(path)
        assert 3 < len(clips) < 20
        assert [c.targets[0] for c in clips] == [str(i) for i in range(len(clips))]
        assert report.counts["corrupt shard"] == 1 and "t.tar.gz" in report.examples["corrupt shard"][0]
        assert "corrupt shard" in report.summary()

    def test_not_a_tar(self, tmp_path):
        path = tmp_path / "junk.tar.gz"
        path.write_bytes(gzip.compress(b"this is not a tar archive" * 100))
        clips, report = read(path)
        assert clips == [] and report.counts["corrupt shard"] == 1
        path.write_bytes(b"\x89PNG garbage")
        clips, report = read(path)
        assert clips == [] and report.counts["corrupt shard"] == 1


class TestLoadAudio:
    def test_path_and_bytes(self, tmp_path):
        data = audio_bytes(0.25, 32000, 2)
        (tmp_path / "a.wav").write_bytes(data)
        a, b = load_audio(tmp_path / "a.wav"), load_audio(data)
        assert a.shape == b.shape == (4000,) and np.allclose(a, b)

    def test_unreadable_raises_data_error(self):
        with pytest.raises(DataError, match="not decodable audio"):
            load_audio(b"nope", name="x.wav")

    def test_loud_clip_is_divided_by_its_peak(self):
        # a float file may exceed 1; XARES-LLM divides such a clip by its peak (after the mono mix)
        t = np.arange(8000) / 16000
        wave = np.stack([2.5 * np.sin(2 * np.pi * 300 * t), 1.5 * np.sin(2 * np.pi * 300 * t)], axis=1)
        buf = io.BytesIO()
        sf.write(buf, wave.astype(np.float32), 16000, format="WAV", subtype="FLOAT")
        got = load_audio(buf.getvalue())
        mono = wave.mean(axis=1)
        np.testing.assert_allclose(got, mono / np.abs(mono).max(), atol=1e-6)
        assert np.abs(got).max() == pytest.approx(1.0)
        # a clip within [-1, 1] is left as it is
        buf = io.BytesIO()
        sf.write(buf, (0.5 * mono / np.abs(mono).max()).astype(np.float32), 16000, format="WAV", subtype="FLOAT")
        assert np.abs(load_audio(buf.getvalue())).max() == pytest.approx(0.5)

    def test_empty_is_empty(self):
        assert load_audio(audio_bytes(0.0)).size == 0


def test_write_shard_is_reproducible(tmp_path):
    members = [("a.wav", audio_bytes()), ("a.json", label(label="x"))]
    one = write_shard(tmp_path / "1.tar.gz", members).read_bytes()
    two = write_shard(tmp_path / "2.tar.gz", members).read_bytes()
    assert one == two


def test_clips_by_key_reads_only_the_shards_it_needs(tmp_path, monkeypatch):
    from evaluator.data import TaskSpec, clips_by_key, iter_clips
    from evaluator.data import shards as shards_module

    for s in range(3):
        members = []
        for i in range(3):
            members += [(f"c{i}.wav", audio_bytes(freq=200.0 + 100 * (3 * s + i))), (f"c{i}.json", label(label=f"x{s}{i}"))]
        write_shard(tmp_path / f"part_{s}.tar.gz", members)
    task = TaskSpec(id="t", name="t", track="custom", test_shards=(str(tmp_path / "part_*.tar.gz"),),
                    eval_keys=KEYS, metric="Accuracy")
    every = {c.key: c for c in iter_clips(task, "test", download=False)}
    opened = []
    real = shards_module.read_shard
    monkeypatch.setattr(shards_module, "read_shard", lambda path, **kw: (opened.append(Path(path).name), real(path, **kw))[1])
    wanted = ["part_0.tar.gz/c1", "part_2.tar.gz/c0", "part_2.tar.gz/c2"]
    got = clips_by_key(task, "test", wanted)
    assert sorted(got) == sorted(wanted) and sorted(opened) == ["part_0.tar.gz", "part_2.tar.gz"]
    for key in wanted:
        np.testing.assert_array_equal(got[key].audio, every[key].audio)
        assert got[key].targets == every[key].targets
