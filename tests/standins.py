"""Offline stand-ins for what the README's examples expect a reader to have downloaded: the official tracks'
shards, the SmolLM2-135M decoder in the Hugging Face cache, and an organizer's hidden config.

Everything goes through the real lookup code: shards at the repo-relative paths the track YAMLs name
(under the data home, as XARES-LLM's downloader lays them out), the decoder in huggingface_hub's cache
layout under ``$HF_HOME`` (found by name, offline), the hidden tracks as the organizer's YAML. Only the
contents are small: one short clip per shard file and a smoke decoder with SmolLM2's name.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import soundfile as sf
import yaml

from evaluator.data import get_track, shard_files, write_shard

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M"
WORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")


def _wav(seconds: float, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    t = np.arange(int(16_000 * seconds)) / 16_000
    audio = 0.3 * np.sin(2 * np.pi * (200 + 40 * (seed % 17)) * t) + 0.02 * rng.standard_normal(t.size)
    buf = io.BytesIO()
    sf.write(buf, audio.astype(np.float32), 16_000, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def write_track_shards(tracks: tuple[str, ...], home: Path, *, seconds: float = 0.5,
                       hidden_config: Path | None = None) -> int:
    """One clip per shard file of every split of every task of ``tracks``, at the path the track names.

    Labels are words drawn per shard under the task's first label key, so every metric has more than one
    class to score. Returns the number of shard files written (existing ones are kept).
    """
    written = 0
    for name in tracks:
        track = get_track(name, hidden_config=hidden_config, data_home=home)
        for task in track.tasks:
            for split in ("train", "test"):
                keys = task.keys(split)
                for i, shard in enumerate(shard_files(task, split, data_home=home).files):
                    if shard.present:
                        continue
                    label = f"{WORDS[i % len(WORDS)]} {WORDS[(i // 2) % len(WORDS)]}" if name.startswith("B") \
                        else WORDS[i % 3]
                    key = f"{task.id}_{split}_{i:05d}"
                    doc = {keys[0] if keys else "label": label}
                    seed = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)
                    write_shard(shard.path, [(f"{key}.wav", _wav(seconds, seed)),
                                             (f"{key}.json", json.dumps(doc).encode())])
                    written += 1
    return written


def install_in_hub_cache(decoder: Path, hf_home: Path, repo_id: str = SMOLLM2) -> Path:
    """Put a saved decoder folder into huggingface_hub's cache under ``repo_id``, as `hf download` leaves it:
    ``$HF_HOME/hub/models--ORG--NAME/{refs/main, snapshots/<commit>/...}``. Returns the snapshot folder."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    if not snapshot.is_dir():
        shutil.copytree(decoder, snapshot)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def write_hidden_config(path: Path, shards: Path) -> Path:
    """An organizer's hidden config: A-hidden (own decoder, one task) and B-hidden (eval only, one task),
    inline XARES-LLM documents over local shards under ``shards``; the shards are written too."""
    a_train = {"max_steps": 100000, "train_data": {"HiddenSounds": {
        "prompt": "Classify the sound.", "data": [str(shards / "hidden_sounds_train_{0..1}.tar.gz")],
        "key": "label", "prob": 1}}}
    a_eval = {"eval_hiddensounds": {"data": {"data": [str(shards / "hidden_sounds_test_0.tar.gz")], "key": "label",
                                             "prompt": "Classify the sound."}, "metric": "Accuracy"}}
    b_eval = {"eval_hiddenspeech": {"data": {"data": [str(shards / "hidden_speech_test_0.tar.gz")], "key": "text",
                                             "prompt": "Transcribe the speech."}, "metric": "iWER"}}
    for i, name in enumerate(["hidden_sounds_train_0", "hidden_sounds_train_1", "hidden_sounds_test_0",
                              "hidden_speech_test_0"]):
        key = "text" if "speech" in name else "label"
        write_shard(shards / f"{name}.tar.gz", [(f"{name}_{j}.{ext}", data) for j in range(2) for ext, data in (
            ("wav", _wav(0.5, 100 * i + j)), ("json", json.dumps({key: WORDS[(i + j) % 3]}).encode()))])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"A-hidden": {"train": a_train, "eval": a_eval}, "B-hidden": {"eval": b_eval}}))
    return path
