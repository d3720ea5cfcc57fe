"""Offline demo tracks, generated with espeak-ng and sox: small, learnable, byte-for-byte reproducible.

``demo-a`` (classification, like Track A): spoken keywords (Accuracy), voice type (Accuracy) and
multi-label synthetic sounds (mAP). ``demo-b`` (understanding, like Track B): spoken sentences (iWER)
and captions of synthetic sounds (iWER; Track B scores captions with FENSE, whose models cannot be
downloaded offline, so the demo scores them by word overlap instead).

The output is the same webdataset shards and XARES-LLM YAML files real data uses, so a demo run takes
exactly the code path of a real one. The same seed on the same espeak-ng/sox versions gives the same
bytes (tar mtimes, owners and gzip headers are fixed).

Example::

    xares-eval demo-data --out xares_data --track all
    # or: generate_demo("demo-a", Path("xares_data/demo-a"))
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import yaml

from evaluator.data.shards import write_shard
from evaluator.errors import ConfigError, EnvironmentUnavailable

log = logging.getLogger(__name__)

SYNTH_RATE = 16_000  # Hz, sox synthesis rate (espeak-ng speaks at its own 22.05 kHz: the reader resamples)
TOOL_TIMEOUT_S = 30  # per espeak-ng/sox call
TRAIN_SHARDS = 2  # per task: exercises brace expansion in the YAML
MIN_SPEECH_S = 0.6  # short words ("up") are padded with silence to at least this many seconds

# Training fields of the demo train YAMLs: a small decoder must learn these in minutes on CPU.
DEMO_TRAINING = {
    "max_steps": 600,
    "learning_rate": 1.0e-3,
    "warmup_steps": 50,
    "per_device_train_batch_size": 8,
    "seed": 42,
}

KEYWORDS = ("yes", "no", "up", "down", "stop")
VOICES = ("en-us", "en-gb", "en-029", "en-gb-scotland", "en-us+f3", "en-us+m3", "en-gb+f2")
PHRASES = ("hello there", "good morning", "see you soon", "thank you", "one two three", "how are you")
VOICE_TYPES = {  # label -> (espeak voice, pitch range)
    "low": ("en-us+m3", (0, 12)),
    "high": ("en-us+f4", (88, 99)),
    "whisper": ("en-us+whisper", (40, 60)),
}
SOUNDS = ("beep", "hum", "noise", "sweep")  # multi-label classes; labels joined with ';' in this order
COLORS, ANIMALS, VERBS = ("red", "blue", "green"), ("cat", "dog", "bird"), ("runs", "sleeps", "jumps")
CAPTIONS = {  # sound mixture -> its caption
    ("beep",): "a high beep repeats",
    ("hum",): "a low hum drones on",
    ("sweep",): "a tone rises in pitch",
    ("noise",): "static noise hisses",
    ("beep", "noise"): "a beep repeats over static noise",
    ("hum", "sweep"): "a rising tone over a low hum",
}


# ------------------------------------------------------------------------------------------- recipes


@dataclass(frozen=True)
class Speech:
    """espeak-ng -v VOICE -s SPEED -p PITCH TEXT"""

    text: str
    voice: str
    speed: int
    pitch: int


@dataclass(frozen=True)
class Sounds:
    """Synthetic sounds (sox synth) mixed with fixed gains, cropped to ``seconds``."""

    kinds: tuple[str, ...]
    seconds: float
    params: tuple[tuple[float, ...], ...]  # per kind: frequencies / rates
    gains: tuple[float, ...]
    offset: float  # seconds into the (repeatable) noise


@dataclass(frozen=True)
class DemoTask:
    """One demo task: how to draw a sample (label + recipe) and how the YAML describes it."""

    name: str  # train name; the eval name is "eval_" + name.lower()
    slug: str  # folder and shard names
    prompt: str
    label_field: str  # json field the label is written to
    train_key: str
    eval_key: str
    metric: str
    draw: Callable[[np.random.Generator], tuple[str, Speech | Sounds]]
    n_train: int
    n_test: int
    audio: str = "wav"  # member extension: wav or flac
    metric_args: dict[str, Any] = field(default_factory=dict)


def _speech(text: str, rng: np.random.Generator, voices=VOICES, pitch=(25, 75)) -> Speech:
    return Speech(text, str(rng.choice(voices)), int(rng.integers(140, 200)), int(rng.integers(pitch[0], pitch[1] + 1)))


def _draw_keyword(rng):
    word = str(rng.choice(KEYWORDS))
    return word, _speech(word, rng)


def _draw_voice(rng):
    label = str(rng.choice(sorted(VOICE_TYPES)))
    voice, pitch = VOICE_TYPES[label]
    return label, _speech(str(rng.choice(PHRASES)), rng, voices=(voice,), pitch=pitch)


def _draw_sentence(rng):
    text = f"the {rng.choice(COLORS)} {rng.choice(ANIMALS)} {rng.choice(VERBS)}"
    return text, _speech(text, rng, voices=VOICES[:4])


def _sounds(kinds: tuple[str, ...], rng: np.random.Generator) -> Sounds:
    params = []
    for k in kinds:
        if k == "beep":
            params.append((float(rng.uniform(900, 1400)), float(rng.uniform(0.08, 0.15))))  # Hz, gap s
        elif k == "hum":
            params.append((float(rng.uniform(90, 160)),))
        elif k == "sweep":
            params.append((float(rng.uniform(250, 400)), float(rng.uniform(2500, 3500))))
        else:
            params.append(())
    return Sounds(
        kinds=kinds,
        seconds=round(float(rng.uniform(1.0, 2.0)), 2),
        params=tuple(params),
        gains=tuple(round(float(rng.uniform(0.5, 1.0)), 3) for _ in kinds),
        offset=round(float(rng.uniform(0.0, 1.0)), 3),
    )


def _draw_multilabel(rng):
    n = 1 if rng.random() < 0.4 else 2
    kinds = tuple(sorted(rng.choice(SOUNDS, size=n, replace=False).tolist(), key=SOUNDS.index))
    return ";".join(kinds), _sounds(kinds, rng)


def _draw_caption(rng):
    mixtures = sorted(CAPTIONS)
    kinds = mixtures[int(rng.integers(len(mixtures)))]
    return CAPTIONS[kinds], _sounds(kinds, rng)


DEMO_TASKS: dict[str, tuple[DemoTask, ...]] = {
    "demo-a": (
        DemoTask("Demo-Keywords", "keywords", "Classify the keyword.", "text",
                 "text;caption;captions;label;labels", "text;caption;captions;label;labels", "Accuracy",
                 _draw_keyword, n_train=120, n_test=40),
        DemoTask("Demo-Voices", "voices", "Identify the type of voice.", "label", "label", "label", "Accuracy",
                 _draw_voice, n_train=96, n_test=32, audio="flac"),
        DemoTask("Demo-Sounds", "sounds", "Multi-label classification of the sounds.", "labels", "label;labels",
                 "label;labels", "mAP", _draw_multilabel, n_train=96, n_test=32,
                 metric_args={"num_classes": len(SOUNDS)}),
    ),
    "demo-b": (
        DemoTask("Demo-Sentences", "sentences", "Transcribe the English speech into text", "trans", "trans",
                 "trans", "iWER", _draw_sentence, n_train=120, n_test=40, audio="flac"),
        # Real captioning tasks are scored with FENSE (models not downloadable offline): iWER here.
        DemoTask("Demo-Captions", "captions", "Generate a short caption for the audio.", "caption",
                 "text;caption;captions;label;labels", "caption;captions", "iWER", _draw_caption,
                 n_train=96, n_test=32),
    ),
}


# --------------------------------------------------------------------------------------------- YAMLs


def demo_documents(track: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The XARES-LLM train and eval documents of a demo track (shard paths relative to its folder).

    Raises:
        ConfigError: not a demo track.
    """
    tasks = _tasks(track)
    train: dict[str, Any] = dict(DEMO_TRAINING)
    train["train_data"] = {
        t.name: {
            "prompt": t.prompt,
            "data": [f"{t.slug}/train/train_{{000000..{TRAIN_SHARDS - 1:06d}}}.tar.gz"],
            "key": t.train_key,
            "prob": 1,
        }
        for t in tasks
    }
    evaluation: dict[str, Any] = {}
    for t in tasks:
        entry: dict[str, Any] = {
            "data": {"data": [f"{t.slug}/test/test_000000.tar.gz"], "key": t.eval_key, "prompt": t.prompt},
            "batch_size": 8,
            "num_workers": 0,
            "metric": t.metric,
        }
        if t.metric_args:
            entry["metric_args"] = dict(t.metric_args)
        evaluation[f"eval_{t.name.lower()}"] = entry
    return train, evaluation


def _tasks(track: str) -> tuple[DemoTask, ...]:
    if track not in DEMO_TASKS:
        raise ConfigError(f"unknown demo track {track!r}; known: {', '.join(DEMO_TASKS)}")
    return DEMO_TASKS[track]


# ---------------------------------------------------------------------------------------- generation


def generate_demo(track: str, out_dir: Path, seed: int = 0, *, workers: int | None = None) -> tuple[Path, Path]:
    """Write a demo track's shards and XARES-LLM YAMLs into ``out_dir``.

    Args:
        track: "demo-a" or "demo-b".
        out_dir: the track folder (``get_track(track, data_home=D)`` reads ``D/<track>``).
        seed: drawing seed; the same seed gives the same bytes.
        workers: parallel espeak-ng/sox processes (default: CPU count, at least 2).

    Returns:
        (train YAML path, eval YAML path).

    Raises:
        ConfigError: unknown demo track.
        EnvironmentUnavailable: espeak-ng or sox is missing or fails.
    """
    tasks = _tasks(track)
    _require_tools(tasks)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    workers = workers or max(2, os.cpu_count() or 2)
    # Draw every sample first, in a fixed order, so thread scheduling cannot change the result.
    plan = []
    for ti, task in enumerate(tasks):
        rng = np.random.default_rng([seed, ti])
        for split, n in (("train", task.n_train), ("test", task.n_test)):
            for i in range(n):
                label, recipe = task.draw(rng)
                plan.append((task, split, i, label, recipe))
    with tempfile.TemporaryDirectory(prefix="xares-demo-") as tmp, ThreadPoolExecutor(workers) as pool:
        jobs = [(recipe, Path(tmp) / f"{n}") for n, (_, _, _, _, recipe) in enumerate(plan)]
        waves = list(pool.map(lambda job: _render(*job), jobs))
    for task in tasks:
        _write_task(task, [(p, w) for p, w in zip(plan, waves) if p[0] is task], out_dir)
    train_doc, eval_doc = demo_documents(track)
    train_yaml, eval_yaml = out_dir / f"{track}_train.yaml", out_dir / f"{track}_eval.yaml"
    header = f"# {track}: generated by `xares-eval demo-data` (seed {seed}); XARES-LLM format, paths relative to this file\n"
    for path, doc in ((train_yaml, train_doc), (eval_yaml, eval_doc)):
        tmp_path = path.with_name(path.name + ".partial")
        tmp_path.write_text(header + yaml.safe_dump(doc, sort_keys=False, default_flow_style=False), encoding="utf-8")
        tmp_path.replace(path)
    log.info("demo track %s written to %s", track, out_dir)
    return train_yaml, eval_yaml


def _write_task(task: DemoTask, samples: list, out_dir: Path) -> None:
    for split, shards in (("train", TRAIN_SHARDS), ("test", 1)):
        rows = [(p, w) for p, w in samples if p[1] == split]
        for s in range(shards):
            members: list[tuple[str, bytes]] = []
            for (_, _, i, label, _), (wave, rate) in rows[s::shards]:
                key = f"{task.slug}_{split}_{i:05d}"
                members.append((f"{key}.{task.audio}", _encode(wave, rate, task.audio)))
                members.append((f"{key}.json", json.dumps({task.label_field: label}, sort_keys=True).encode()))
            write_shard(out_dir / task.slug / split / f"{split}_{s:06d}.tar.gz", members)


def _encode(wave: np.ndarray, rate: int, ext: str) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, wave, rate, format=ext.upper(), subtype="PCM_16")
    return buf.getvalue()


def _require_tools(tasks: tuple[DemoTask, ...]) -> None:
    for tool in ("espeak-ng", "sox"):
        if shutil.which(tool) is None:
            raise EnvironmentUnavailable(f"{tool} is not installed; the demo data needs it (apt-get install {tool})")


def _run(cmd: list[str]) -> None:
    try:
        proc = subprocess.run(cmd, capture_output=True, timeout=TOOL_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise EnvironmentUnavailable(f"{cmd[0]} failed: {e}") from e
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip().splitlines()
        raise EnvironmentUnavailable(f"{' '.join(cmd[:4])} ... exited {proc.returncode}: {err[-1] if err else ''}")


def _read(path: Path) -> tuple[np.ndarray, int]:
    wave, rate = sf.read(str(path), dtype="float32", always_2d=True)
    return wave.mean(axis=1), rate


def _render(recipe: Speech | Sounds, stem: Path) -> tuple[np.ndarray, int]:
    if isinstance(recipe, Speech):
        out = stem.with_suffix(".wav")
        _run(["espeak-ng", "-w", str(out), "-v", recipe.voice, "-s", str(recipe.speed), "-p", str(recipe.pitch), recipe.text])
        wave, rate = _read(out)
        short = int(MIN_SPEECH_S * rate) - len(wave)
        if short > 0:
            wave = np.pad(wave, (short // 2, short - short // 2))
        return wave, rate
    n = round(recipe.seconds * SYNTH_RATE)
    mix = np.zeros(n, dtype=np.float32)
    for j, (kind, params, gain) in enumerate(zip(recipe.kinds, recipe.params, recipe.gains)):
        out = Path(f"{stem}_{j}.wav")
        _run(["sox", "-R", "-n", "-r", str(SYNTH_RATE), "-b", "16", "-c", "1", str(out), *_synth(kind, params, recipe)])
        wave, _ = _read(out)
        if kind == "noise":  # sox -R repeats the same noise: start at a drawn offset for variety
            start = int(recipe.offset * SYNTH_RATE)
            wave = wave[start:]
        wave = np.pad(wave[:n], (0, max(0, n - len(wave[:n]))))
        peak = float(np.abs(wave).max()) or 1.0
        mix += gain * wave / peak
    mix *= 0.7 / max(float(np.abs(mix).max()), 1e-6)
    return mix.astype(np.float32), SYNTH_RATE


def _synth(kind: str, params: tuple[float, ...], recipe: Sounds) -> list[str]:
    seconds = f"{recipe.seconds:.2f}"
    if kind == "beep":
        freq, gap = params
        repeats = int(recipe.seconds / (0.12 + gap)) + 1
        return ["synth", "0.12", "sine", f"{freq:.1f}", "fade", "0", "0.12", "0.02", "pad", "0", f"{gap:.3f}",
                "repeat", str(repeats)]
    if kind == "hum":
        return ["synth", seconds, "square", f"{params[0]:.1f}", "lowpass", "800"]
    if kind == "sweep":
        return ["synth", seconds, "sine", f"{params[0]:.0f}-{params[1]:.0f}"]
    return ["synth", f"{recipe.seconds + 1.0:.2f}", "pinknoise"]
