"""The model zoo: encoders shaped like the challenge's real submissions go through build, validate and a
short `xares-eval run` on the demo-a track (issue 9, item 7).

Each folder under ``tests/zoo/`` is a participant's submission folder (``encoder.py``, optional
``manifest.json`` and sibling files), built from real architecture code with random weights, except
``silero`` (trained weights from the silero-vad wheel, copied beside its encoder.py):

==============  ====================================================  ====  ======  =================
folder          what                                                  D     hop     frames
==============  ====================================================  ====  ======  =================
whisper         transformers WhisperEncoder, padded to 30 s, trimmed   64    20 ms   follow the audio
whisper_fixed   the same, always its 1500 frames, no mask              64    -       fixed (1500)
wavlm           WavLMModel, WavLM-Base-Plus front-end (GroupNorm)      96    20 ms   follow; padding-sensitive
wav2vec2        Wav2Vec2Model, wav2vec2-base-like (GroupNorm)          64    20 ms   follow; padding-sensitive
qwen2audio      Qwen2AudioEncoder (avg-pooled), padded to 30 s         64    40 ms   follow the audio
fusion          wav2vec2 (20 ms) + mel-conv branch in branches.py      96    20 ms   follow the audio
                (40 ms, upsampled), concatenated
cliplevel       ECAPA-TDNN-like, attentive statistics pooling         192    -       fixed (1)
silero          Silero VAD's trained conv encoder (real weights)      128    32 ms   follow the audio
silero_jit      the silero-vad wheel's TorchScript file                 -    -       refused at build
==============  ====================================================  ====  ======  =================

For every encoder the test checks what the evaluator must get right, not only that it ran: the build
report records padding sensitivity exactly for the encoders that have it; the archive carries the
complete source; every stored clip has the frame count its declared mode implies; and one stored
clip equals the torch encoder's own output for that clip alone (so padding never reached it).
"""

from __future__ import annotations

import json
import re
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import demo_a_world

from evaluator.data import iter_clips
from evaluator.features import FeatureStore
from evaluator.runner import RunOptions, run_submission

pytestmark = pytest.mark.slow

ZOO = Path(__file__).parent / "zoo"
PADDING_RTOL = 1e-3  # the probe's tolerance (ProbeConfig.padding_rtol)
STORED_RTOL = 5e-3  # stored (float16) vs torch, relative to the clip's peak


@dataclass(frozen=True)
class Expect:
    dim: int
    hop_ms: float | None = None  # frames follow the audio at this hop ...
    fixed: int | None = None  # ... or every clip gives this many ("frames": "fixed")
    padding_sensitive: bool = False  # the probe must measure and record it
    sources: tuple[str, ...] = ("encoder.py",)  # files the archive's source/ must hold (at least)


ZOO_CASES = {
    "whisper": Expect(dim=64, hop_ms=20.0),
    "whisper_fixed": Expect(dim=64, fixed=1500),
    "wavlm": Expect(dim=96, hop_ms=20.0, padding_sensitive=True),
    "wav2vec2": Expect(dim=64, hop_ms=20.0, padding_sensitive=True),
    "qwen2audio": Expect(dim=64, hop_ms=40.0),
    "fusion": Expect(dim=96, hop_ms=20.0, sources=("branches.py", "encoder.py")),
    "cliplevel": Expect(dim=192, fixed=1),
    "silero": Expect(dim=128, hop_ms=32.0, sources=("encoder.py", "silero_vad_16k.safetensors")),
}
REFUSED = ("silero_jit",)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """demo-a shards and a smoke decoder, made once for the whole zoo."""
    root = tmp_path_factory.mktemp("zoo")
    data_home, track = demo_a_world(root, decoder_steps=40)
    return root, data_home, track


def _options(root: Path, data_home: Path, out: Path) -> RunOptions:
    return RunOptions(out=out, decoder=str(root / "decoder"), max_steps=4, data_home=data_home, download=False,
                      limit_clips=4, progress=False, machine="test", max_new_tokens=8, checkpoint_every=100)


def _member(tar: Path, name: str) -> bytes:
    with tarfile.open(tar) as tf:
        f = tf.extractfile(name)
        assert f is not None, f"{name} is not a file in {tar.name}"
        return f.read()


def _padding_record(report: dict) -> tuple[float | None, str | None]:
    """(largest change padding makes, how extraction batches) as the build report records them.

    The names are those of evaluator/submission/probe.py (ProbeReport.padding_max_rel_diff and
    .batching), found in the report's probe section or its ``measured`` section.
    """
    for section in (report.get("probe") or {}, report.get("measured") or {}):
        if "padding_max_rel_diff" in section:
            return section["padding_max_rel_diff"], section.get("batching")
    return None, None


def test_the_zoo_table_lists_every_folder():
    folders = {p.name for p in ZOO.iterdir() if (p / "encoder.py").is_file()}
    assert folders == set(ZOO_CASES) | set(REFUSED)


@pytest.mark.parametrize("name", sorted(ZOO_CASES))
def test_zoo_encoder_builds_validates_and_runs(name, world, tmp_path, record_property):
    from evaluator.submission.build import BuildOptions, build
    from evaluator.submission.export import load_encoder
    from evaluator.submission.validate import validate

    expect = ZOO_CASES[name]
    root, data_home, track = world
    tar = tmp_path / f"{name}.tar"

    # -- build: the measured contract, the report, the complete source ------------------------------
    started = time.perf_counter()
    built = build(ZOO / name, tar, BuildOptions(team="zoo"))
    record_property("build_s", round(time.perf_counter() - started, 1))  # in --junitxml reports
    manifest = built.manifest
    assert manifest.output_dim == expect.dim
    if expect.fixed is not None:
        assert manifest.frames == "fixed" and manifest.schema_version >= 2
        assert built.probe.fixed_frames == expect.fixed
        assert set(built.probe.frames) == {expect.fixed}
    else:
        assert manifest.frame_hop_ms == pytest.approx(expect.hop_ms, rel=0.02)
    report = json.loads(_member(tar, "build_report.json"))
    diff, batching = _padding_record(report)
    assert diff is not None, "the build report does not record the padding measurement"
    if expect.padding_sensitive:
        assert diff > PADDING_RTOL and batching in ("equal_length", "alone"), (diff, batching)
        assert report["probe"]["padding_cause"], "a padding-sensitive encoder needs its likely cause named"
    else:
        assert diff <= PADDING_RTOL and batching == "padded", (diff, batching)
    with tarfile.open(tar) as tf:
        sources = sorted(m.name.removeprefix("source/") for m in tf.getmembers() if m.name.startswith("source/"))
    own_files = {p.name for p in (ZOO / name).iterdir() if p.is_file()}
    assert set(expect.sources) <= set(sources) <= own_files, sources  # what it imports and reads; nothing else

    # -- validate: the organizer's offline checks accept what build wrote ---------------------------
    started = time.perf_counter()
    checked = validate(tar)
    record_property("validate_s", round(time.perf_counter() - started, 1))
    assert checked.probe.ok and checked.manifest == manifest

    # -- run: a short evaluation on demo-a ------------------------------------------------------------
    lines: list[str] = []
    out = tmp_path / "out"
    started = time.perf_counter()
    outcome = run_submission(tar, track, _options(root, data_home, out), echo=lines.append)
    record_property("run_s", round(time.perf_counter() - started, 1))
    assert any(re.search(r"probe: \d+ checks passed", line) for line in lines), lines
    doc = json.loads(outcome.results_path.read_text())
    assert sorted(t["task"] for t in doc["tasks"]) == sorted(t.id for t in track.eval_tasks)
    assert [t["status"] for t in doc["tasks"]] == ["ok"] * len(doc["tasks"]), doc["tasks"]

    stores = [s for s in FeatureStore.scan(out / "features") if s.key.submission_sha256 == built.sha256]
    assert {(s.key.task, s.key.split) for s in stores} == (
        {(t.id, "train") for t in track.train_tasks} | {(t.id, "test") for t in track.eval_tasks})
    for store in stores:
        assert store.complete and store.dim == expect.dim and not store.failures
        assert len(store.entries) == 4
        for entry in store.entries.values():
            if expect.fixed is not None:
                assert entry.frames == expect.fixed, (store.key.task, entry.key, entry.frames)
            else:
                want = entry.seconds * 1000.0 / expect.hop_ms
                assert abs(entry.frames - want) <= max(2.0, 0.02 * want), (entry.key, entry.frames, want)

    # one stored clip is the encoder's own output for that clip alone (padding never reached it)
    import torch

    task = track.eval_tasks[0]
    clip = next(iter(iter_clips(task, "test", data_home=data_home, limit=1)))
    store = next(s for s in stores if s.key.task == task.id and s.key.split == "test")
    stored = np.asarray(store.features(clip.key), dtype=np.float32)
    encoder = load_encoder(ZOO / name / "encoder.py")
    audio = torch.from_numpy(clip.audio)[None]
    with torch.no_grad():
        feats, fmask = encoder(audio, torch.ones_like(audio, dtype=torch.long))
    own = feats[0].numpy() if fmask is None else feats[0][fmask[0].bool()].numpy()
    assert stored.shape == own.shape
    peak = float(np.abs(own).max())
    assert float(np.abs(stored - own).max()) <= STORED_RTOL * peak


def test_a_torchscript_encoder_is_refused_at_build_with_the_cause_and_the_ways_out(tmp_path):
    pytest.importorskip("silero_vad")
    from evaluator.errors import SubmissionError
    from evaluator.submission.build import BuildOptions, build

    tar = tmp_path / "silero_jit.tar"
    with pytest.raises(SubmissionError) as info:
        build(ZOO / "silero_jit", tar, BuildOptions(team="zoo"))
    text = "\n".join([str(info.value), *(getattr(info.value, "reasons", None) or [])])
    # the cause, not only the name of the fallback exporter ("TorchScript exporter: ...")
    causes = [line for line in text.splitlines() if "TorchScript" in line and "TorchScript exporter" not in line]
    assert causes and any("jit" in line for line in causes), text
    assert "plain torch" in text and "container" in text, text  # the ways out
    assert not tar.exists()
