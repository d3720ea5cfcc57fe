"""Fidelity benchmark: the real XARES-LLM reference and this evaluator, scored on the same work.

Both sides get the same XARES-format webdataset shards (``<key>.wav`` + ``<key>.json``), the same
train/eval YAMLs (the reference's custom-data format), the same frozen encoders (``encoders.py``: four of
clearly different quality, fixed weights), the same tiny decoder folder
(``evaluator.smoke_decoder.build_smoke_decoder``), the same ``max_steps`` and training seed; everything
else stays at each side's defaults. Per task and encoder it reports both sides' score (mean ± std over
the seeds), their difference, whether the difference is within the reference's own seed spread
(max - min), the encoders' mean scores on both sides and the Spearman rank correlation between them.

* **Reference:** its own CLI, ``python -m xares_llm.run fidelity_encoders.<Class> train.yaml eval.yaml
  --args {...}``, in its own venv (``benchmarks/setup_reference.sh``), through
  ``bench_reference.LAUNCHER_SOURCE`` (the torchaudio work-around for a CPU-only torch), wrapped here so
  the stand-in wav reader also reads float32 wav (the clips whose peak is above 1). Scores come from its
  ``score_<eval>.yaml``, answers from ``predictions_<eval>.csv``. One output folder per (encoder, seed)
  is kept and reused (the reference itself skips training when a checkpoint exists and evaluation when
  the score file exists).
* **Ours:** the public CLI only: ``xares-submit build`` (ONNX export + probe) once per encoder, then
  ``xares-eval run submission.tar --train-config ... --eval-config ... --decoder ... --max-steps N
  --seed S --out <out>/ours``. Its feature store and runs under ``<out>/ours`` are reused by reruns
  (``--fresh-ours`` deletes them first, e.g. after the evaluator changed).

The synthetic tasks stress the protocol points where the two could part:

* ``eval_pitch``    single-label Accuracy, six tones a half-octave apart (the encoders separate them to
  different degrees);
* ``eval_captions`` each clip's json holds a LIST of 2-3 paraphrases (one sample per text at training
  and at evaluation, accuracy per reference), a few lists also hold a corrupt text;
* ``eval_mixture``  multi-label mAP (``"tone;clicks"``) with ``metric_args: {num_classes: 5}`` (one more
  column than labels used);
* ``eval_colours``  noise colours and a hum; a few labels are corrupt (``!!!???``, combining diacritics:
  the reference drops them) and a few clips are float32 wav with a peak above 1 (divided by the peak).

    benchmarks/setup_reference.sh /tmp/xares-llm-src /tmp/xares-ref-venv      # once
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/fidelity/run.py --quick \\
        --reference-python /tmp/xares-ref-venv/bin/python --reference-src /tmp/xares-llm-src
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/fidelity/run.py --reference-python ... --reference-src ... \\
        --out /tmp/fidelity                                  # full size, seeds 42 43 44
    ... --only ours --fresh-ours                           # rerun our side only, reuse the reference's

Writes ``<out>/fidelity.json`` and ``<out>/fidelity.md``. Without the reference it prints one line and
exits 2.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import importlib.util
import io
import json
import math
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE.parent))  # benchmarks/: bench_reference
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

SAMPLE_RATE = 16_000
SEEDS = (42, 43, 44)
ENCODER_MODULE = "fidelity_encoders"  # encoders.py as the reference and the submission folders import it
TRAIN_YAML, EVAL_YAML = "fidelity_train.yaml", "fidelity_eval.yaml"
CORRUPT_TEXTS = ("!!!???", "n\u0333\u0366\u0333\u0366\u0333oise")  # both fail the reference's corrupt-text check

# --- the synthetic tasks -------------------------------------------------------------------------
PITCH = {"very low tone": 300.0, "low tone": 420.0, "middle tone": 590.0, "upper tone": 830.0,
         "high tone": 1170.0, "very high tone": 1650.0}
CAPTIONS = {
    "rise": ("a tone sweeps upward", "the pitch rises", "a rising chirp"),
    "fall": ("a tone sweeps downward", "the pitch falls", "a falling chirp"),
    "beeps": ("short beeps repeat", "a beeping sound", "an alarm beeps"),
    "hiss": ("a burst of hiss", "static noise", "a rush of noise"),
}
SOURCES = ("tone", "noise", "beeps", "clicks")  # mixture labels, joined with ';' in this order
COLOURS = ("white noise", "pink noise", "brown noise", "a low hum")
TASKS = {  # name -> (prompt, json key, metric, metric_args)
    "pitch": ("Which tone is this?", "label", "Accuracy", {}),
    "captions": ("Describe the sound in a few words.", "captions", "Accuracy", {}),
    "mixture": ("List the sound sources.", "labels", "mAP", {"num_classes": len(SOURCES) + 1}),
    "colours": ("What kind of noise is this?", "label", "Accuracy", {}),
}


def _tone(f, n, rng, amp):
    t = np.arange(n) / SAMPLE_RATE
    return amp * np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi))


def _coloured(kind, n, rng):
    w = rng.normal(size=n)
    if kind == "white noise":
        x = w
    else:
        spec = np.fft.rfft(w)
        f = np.maximum(np.fft.rfftfreq(n, 1 / SAMPLE_RATE), 20.0)
        spec /= np.sqrt(f) if kind == "pink noise" else f
        x = np.fft.irfft(spec, n)
    return x / (np.abs(x).max() + 1e-9)


def _sweep(f0, f1, n, amp):
    t = np.arange(n) / SAMPLE_RATE
    dur = n / SAMPLE_RATE
    k = math.log(f1 / f0) / dur
    return amp * np.sin(2 * np.pi * f0 * (np.exp(k * t) - 1) / k)


def _beeps(n, rng, amp, f=None):
    t = np.arange(n) / SAMPLE_RATE
    rate = rng.uniform(3, 6)
    gate = (np.sin(2 * np.pi * rate * t) > 0.3).astype(float)
    return amp * gate * np.sin(2 * np.pi * (f or rng.uniform(900, 1400)) * t)


def _clicks(n, rng, amp):
    x = np.zeros(n)
    for pos in rng.integers(0, n - 40, size=int(rng.integers(6, 14))):
        x[pos:pos + 40] += amp * np.hanning(40) * rng.choice([-1, 1])
    return x


def synth(task: str, rng: np.random.Generator) -> tuple[np.ndarray, dict, bool]:
    """One clip of ``task``: (wave, json document, write as float32 wav)."""
    n = int(rng.uniform(1.0, 2.0) * SAMPLE_RATE)
    floor = rng.uniform(0.005, 0.02) * rng.normal(size=n)
    as_float = False
    if task == "pitch":
        label = str(rng.choice(list(PITCH)))
        x = _tone(PITCH[label] * rng.uniform(0.97, 1.03), n, rng, rng.uniform(0.1, 0.5))
        doc = {"label": label}
    elif task == "captions":
        kind = str(rng.choice(list(CAPTIONS)))
        amp = rng.uniform(0.15, 0.5)
        if kind == "rise":
            x = _sweep(rng.uniform(200, 400), rng.uniform(2000, 4000), n, amp)
        elif kind == "fall":
            x = _sweep(rng.uniform(2000, 4000), rng.uniform(200, 400), n, amp)
        elif kind == "beeps":
            x = _beeps(n, rng, amp)
        else:
            x = amp * _coloured("white noise", n, rng) * np.hanning(n) ** 0.3
        texts = [str(t) for t in rng.permutation(CAPTIONS[kind])[: int(rng.integers(2, 4))]]
        if rng.random() < 0.06:  # a corrupt text among good ones: the reference drops that text only
            texts.insert(int(rng.integers(0, len(texts) + 1)), CORRUPT_TEXTS[int(rng.integers(0, 2))])
        doc = {"captions": texts}
    elif task == "mixture":
        k = int(rng.integers(1, 3))
        chosen = sorted(rng.choice(len(SOURCES), size=k, replace=False))
        x = np.zeros(n)
        for i in chosen:
            amp = rng.uniform(0.1, 0.3)
            source = SOURCES[i]
            if source == "tone":
                x += _tone(rng.uniform(300, 600), n, rng, amp)
            elif source == "noise":
                x += amp * _coloured("pink noise", n, rng)
            elif source == "beeps":
                x += _beeps(n, rng, amp, f=rng.uniform(2000, 3000))
            else:
                x += _clicks(n, rng, 2 * amp)
        doc = {"labels": ";".join(SOURCES[i] for i in chosen)}
    elif task == "colours":
        label = str(rng.choice(COLOURS))
        amp = rng.uniform(0.1, 0.5)
        if label == "a low hum":
            f = rng.uniform(90, 130)
            x = _tone(f, n, rng, amp) + _tone(2 * f, n, rng, amp / 3) + _tone(3 * f, n, rng, amp / 5)
        else:
            x = amp * _coloured(label, n, rng)
        r = rng.random()
        if r < 0.08:  # a corrupt label: the reference drops the text, and with it the clip
            label = CORRUPT_TEXTS[int(rng.integers(0, 2))]
        elif r < 0.18:  # float wav with a peak above 1: the reference divides by the peak
            x = x / np.abs(x).max() * rng.uniform(1.5, 3.0)
            floor = floor * 0
            as_float = True
        doc = {"label": label}
    else:
        raise ValueError(task)
    return (x + floor).astype(np.float32), doc, as_float


def float_wav(wave_f32: np.ndarray) -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, wave_f32, SAMPLE_RATE, format="WAV", subtype="FLOAT")
    return buf.getvalue()


def make_data(folder: Path, n_train: int, n_test: int, per_shard: int = 16) -> dict:
    """Shards per task and split; returns {task: {"train": [paths], "test": [paths]}} (reused if complete)."""
    from bench_reference import pcm_wav

    from evaluator.data.shards import write_shard

    layout: dict = {}
    for t_index, task in enumerate(TASKS):
        layout[task] = {}
        for split, n, seed in (("train", n_train, 1000), ("test", n_test, 2000)):
            d = folder / task / split
            done = d / "complete.json"
            if done.is_file() and json.loads(done.read_text()).get("n") == n:
                layout[task][split] = [str(p) for p in sorted(d.glob("*.tar.gz"))]
                continue
            shutil.rmtree(d, ignore_errors=True)
            rng = np.random.default_rng(seed + 100 * t_index)
            members, paths = [], []
            for i in range(n):
                x, doc, as_float = synth(task, rng)
                key = f"{task}_{split}_{i:05d}"
                members += [(f"{key}.wav", float_wav(x) if as_float else pcm_wav(x)),
                            (f"{key}.json", json.dumps(doc).encode())]
            for s, start in enumerate(range(0, len(members), 2 * per_shard)):
                paths.append(str(write_shard(d / f"{split}_{s:04d}.tar.gz", members[start:start + 2 * per_shard])))
            done.write_text(json.dumps({"n": n}))
            layout[task][split] = paths
    return layout


def all_texts(layout: dict) -> list[str]:
    import tarfile

    texts = []
    for task, splits in layout.items():
        for paths in splits.values():
            for p in paths:
                with tarfile.open(p) as tf:
                    for m in tf.getmembers():
                        if m.name.endswith(".json"):
                            v = json.loads(tf.extractfile(m).read())[TASKS[task][1]]
                            texts += v if isinstance(v, list) else [v]
    return texts


def write_configs(folder: Path, layout: dict, steps: int, warmup: int, args) -> tuple[Path, Path]:
    """The reference's custom-data YAMLs (its README's format, JSON spelling); read by both sides."""
    train = {"train_data": {t.capitalize(): {"prompt": TASKS[t][0], "data": layout[t]["train"], "key": TASKS[t][1]}
                            for t in TASKS},
             "num_training_workers": args.ref_train_workers, "max_steps": steps, "warmup_steps": warmup,
             "learning_rate": args.lr}
    evals = {}
    for t, (prompt, key, metric, margs) in TASKS.items():
        evals[f"eval_{t}"] = {"data": {"data": layout[t]["test"], "key": key, "prompt": prompt},
                              "batch_size": args.ref_eval_batch, "num_workers": 0, "metric": metric}
        if margs:
            evals[f"eval_{t}"]["metric_args"] = margs
    folder.mkdir(parents=True, exist_ok=True)
    (folder / TRAIN_YAML).write_text(json.dumps(train, indent=1))
    (folder / EVAL_YAML).write_text(json.dumps(evals, indent=1))
    return folder / TRAIN_YAML, folder / EVAL_YAML


# --- the reference ---------------------------------------------------------------------------------
# Runs bench_reference's launcher (LAUNCHER_SOURCE, written beside this file in the work folder) after
# one addition: when the launcher had to replace torchaudio.load by its 16-bit PCM stand-in, the stand-in
# is widened to read IEEE float32 wav too (same contract: float32 [channels, time], values as stored,
# sample rate), so the clips with a peak above 1 reach the reference's own peak normalisation.
WRAPPER_SOURCE = '''\
import os, runpy, struct, sys

HERE = os.path.dirname(os.path.abspath(__file__))


def read_wav(path):
    import numpy as np
    import torch
    data = open(os.fspath(path), "rb").read()
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise ValueError("not a RIFF/WAVE file")
    pos, fmt, body = 12, None, None
    while pos + 8 <= len(data):
        cid, size = data[pos:pos + 4], struct.unpack("<I", data[pos + 4:pos + 8])[0]
        if cid == b"fmt ":
            fmt = struct.unpack("<HHIIHH", data[pos + 8:pos + 24])
            if fmt[0] == 0xFFFE:  # WAVE_FORMAT_EXTENSIBLE: the sub-format's tag
                fmt = (struct.unpack("<H", data[pos + 32:pos + 34])[0],) + fmt[1:]
        elif cid == b"data":
            body = data[pos + 8:pos + 8 + size]
        pos += 8 + size + (size & 1)
    tag, channels, rate, _, _, bits = fmt
    if (tag, bits) == (1, 16):
        x = np.frombuffer(body, dtype="<i2").astype(np.float32) / 32768.0
    elif (tag, bits) == (3, 32):
        x = np.frombuffer(body, dtype="<f4").astype(np.float32)
    else:
        raise ValueError(f"wav format {tag}/{bits} bits")
    x = x[: len(x) // channels * channels].reshape(-1, channels).T
    return torch.from_numpy(np.ascontiguousarray(x)), rate


_run_module = runpy.run_module


def run_module(name, *args, **kwargs):
    import torchaudio
    if getattr(torchaudio.load, "__name__", "") == "load_pcm_wav":
        print("[bench-launcher] PATCH the 16-bit PCM stand-in for torchaudio.load also reads float32 wav "
              "(fidelity wrapper)", flush=True)
        torchaudio.load = lambda uri, *a, **k: read_wav(uri)
    return _run_module(name, *args, **kwargs)


runpy.run_module = run_module
runpy.run_path(os.path.join(HERE, "ref_launcher.py"), run_name="__main__")
'''


def ref_env(args, work: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(args.reference_src) / "src"), str(work / "enc")]),
               PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               XARES_DATA_HOME=str(work / "ref_xares_data"), NO_COLOR="1")
    env.pop("OMP_WAIT_POLICY", None)
    return env


def reference_key(cfgs, decoder: Path, steps: int) -> str:
    """A key of everything that shapes a reference run, so a changed setting never reuses an old one."""
    weights = decoder / "model.safetensors"
    key_src = json.dumps([(HERE / "encoders.py").read_text(), cfgs[0].read_text(), cfgs[1].read_text(),
                          hashlib.sha256(weights.read_bytes()).hexdigest() if weights.is_file() else "", steps])
    return hashlib.sha256(key_src.encode()).hexdigest()[:12]


def run_reference(args, work: Path, cls: str, seed: int, cfgs, decoder: Path, steps: int, run_dir: Path) -> dict:
    """One (encoder, seed) of the reference; returns {eval name: {score, n, predictions path}}."""
    result_dir = run_dir / Path(TRAIN_YAML).stem / cls
    names = [f"eval_{t}" for t in TASKS]
    if not all((result_dir / f"score_{n}.yaml").is_file() for n in names):
        # max_steps and warmup_steps are in the train YAML (the reference refuses a key given twice)
        overrides = {"seed": seed, "output_dir": str(run_dir), "decoder_model_name": str(decoder)}
        cmd = [args.reference_python, str(work / "ref_wrapper.py"), f"{ENCODER_MODULE}.{cls}", str(cfgs[0]),
               str(cfgs[1]), "--args", json.dumps(overrides)]
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "command.txt").write_text(shlex.join(cmd) + "\n")
        t0 = time.perf_counter()
        with open(run_dir / "ref.log", "w") as log:
            proc = subprocess.run(cmd, cwd=work, env=ref_env(args, work), stdout=log, stderr=subprocess.STDOUT)
        seconds = time.perf_counter() - t0
        if proc.returncode != 0:
            tail = "\n".join((run_dir / "ref.log").read_text(errors="replace").splitlines()[-20:])
            raise RuntimeError(f"reference {cls} seed {seed} failed (exit {proc.returncode}):\n{tail}")
        (run_dir / "seconds.txt").write_text(f"{seconds:.1f}\n")
        say(f"  reference {cls} seed {seed}: {seconds:.0f} s")
    out = {}
    import yaml

    for n in names:
        score = float(yaml.safe_load((result_dir / f"score_{n}.yaml").read_text())["score"])
        pred_path = result_dir / f"predictions_{n}.csv"
        with open(pred_path, newline="") as fh:
            rows = list(csv.DictReader(fh))
        out[n] = {"score": score, "n": len(rows), "predict": [r["predict"] for r in rows],
                  "labels": [r["labels"] for r in rows]}
    log = (run_dir / "ref.log").read_text(errors="replace") if (run_dir / "ref.log").is_file() else ""
    out["_notes"] = sorted({line.split("] ", 1)[1] for line in log.splitlines() if line.startswith("[bench-launcher] PATCH")})
    out["_seconds"] = float((run_dir / "seconds.txt").read_text()) if (run_dir / "seconds.txt").is_file() else None
    return out


# --- ours ------------------------------------------------------------------------------------------
def venv_tool(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def build_submission(work: Path, name: str, cls: str) -> Path:
    """xares-submit build of a folder holding encoder.py (one *Encoder subclassing encoders.py's class)."""
    folder = work / "submissions" / name
    tar = work / "submissions" / f"{name}.tar"
    src = (HERE / "encoders.py").read_text()
    stamp = hashlib.sha256(src.encode()).hexdigest()[:16]
    if tar.is_file() and (folder / "stamp").is_file() and (folder / "stamp").read_text() == stamp:
        return tar
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    (folder / f"{ENCODER_MODULE}.py").write_text(src)
    (folder / "encoder.py").write_text(
        f'"""Fidelity benchmark encoder {name!r}: {ENCODER_MODULE}.{cls} (benchmarks/fidelity/encoders.py)."""\n'
        f"from {ENCODER_MODULE} import {cls} as _Base\n\n\n"
        f"class {cls}(_Base):\n    pass\n")
    cmd = [venv_tool("xares-submit"), "build", str(folder), "-o", str(tar), "--team", "fidelity", "--name", name]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"xares-submit build {name} failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    (folder / "stamp").write_text(stamp)
    return tar


def run_ours(args, work: Path, name: str, tar: Path, seed: int, cfgs, decoder: Path, steps: int) -> dict:
    out_root = work / "ours"
    logs = work / "ours-logs"
    logs.mkdir(parents=True, exist_ok=True)
    cmd = [venv_tool("xares-eval"), "run", str(tar), "--train-config", str(cfgs[0]), "--eval-config", str(cfgs[1]),
           "--decoder", str(decoder), "--max-steps", str(steps), "--seed", str(seed), "--out", str(out_root), "--quiet"]
    if args.ours_threads:
        cmd += ["--threads", str(args.ours_threads)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    seconds = time.perf_counter() - t0
    (logs / f"{name}-seed{seed}.log").write_text(shlex.join(cmd) + "\n" + proc.stdout + "\n" + proc.stderr)
    m = re.search(r"^Results: (.+)$", proc.stdout, re.M)
    if proc.returncode != 0 or not m:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-20:])
        raise RuntimeError(f"xares-eval run {name} seed {seed} failed (exit {proc.returncode}):\n{tail}")
    say(f"  ours {name} seed {seed}: {seconds:.0f} s")
    results_path = Path(m.group(1).strip())
    results = json.loads(results_path.read_text())
    out = {"_seconds": seconds, "_results": str(results_path)}
    for t in results["tasks"]:
        task = t["task"] if t["task"].startswith("eval_") else f"eval_{t['task']}"
        preds = []
        pfile = results_path.parent / "predictions" / f"{t['task']}.jsonl"
        if pfile.is_file():
            preds = [json.loads(line) for line in pfile.read_text().splitlines() if line.strip()]
        refs = [p.get("references", p.get("reference", p.get("labels"))) for p in preds]
        # scored (prediction, reference) pairs, as the reference counts its rows: one per usable text
        n_pairs = sum(len(r) if isinstance(r, list) else 1 for r in refs) if preds else int(t["n_samples"])
        out[task] = {"score": float(t["score"]), "n": n_pairs, "n_clips": int(t["n_samples"]),
                     "status": t.get("status", "ok"), "error": t.get("error"),
                     "predict": [p.get("prediction", p.get("predict", "")) for p in preds], "labels": refs}
    return out


# --- tokenizer round trip on both sides ------------------------------------------------------------
TOKENIZER_CHECK = '''\
import json, sys
from transformers import AutoTokenizer
import transformers
tok = AutoTokenizer.from_pretrained(sys.argv[1])
job = json.load(open(sys.argv[2]))
print(json.dumps({"transformers": transformers.__version__, "class": type(tok).__name__,
                  "encode": [tok(t)["input_ids"] for t in job["texts"]],
                  "decode": tok.batch_decode(job["ids"], skip_special_tokens=True),
                  "eos": tok.eos_token_id, "pad": tok.pad_token_id, "padding_side": tok.padding_side}))
'''


def tokenizer_check(args, work: Path, decoder: Path, texts: list[str]) -> dict:
    rng = np.random.default_rng(0)
    vocab = json.loads((decoder / "tokenizer.json").read_text())["model"]["vocab"]
    n = len(vocab)
    ids = [rng.integers(0, n, size=int(rng.integers(1, 16))).tolist() for _ in range(200)]
    texts = sorted(set(texts))
    (work / "tokcheck.json").write_text(json.dumps({"texts": texts, "ids": ids}))
    (work / "tokcheck.py").write_text(TOKENIZER_CHECK)
    sides = {}
    for who, py in (("reference", args.reference_python), ("ours", sys.executable)):
        proc = subprocess.run([py, str(work / "tokcheck.py"), str(decoder), str(work / "tokcheck.json")],
                              capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
        if proc.returncode != 0:
            return {"error": f"{who}: {proc.stderr.strip().splitlines()[-1:]}"}
        sides[who] = json.loads(proc.stdout.strip().splitlines()[-1])
    r, o = sides["reference"], sides["ours"]
    enc_diff = [t for t, a, b in zip(texts, r["encode"], o["encode"]) if a != b]
    dec_diff = [(i, a, b) for i, a, b in zip(ids, r["decode"], o["decode"]) if a != b]
    return {"texts": len(texts), "id_sequences": len(ids), "encode_differs": len(enc_diff),
            "decode_differs": len(dec_diff), "encode_examples": enc_diff[:5],
            "decode_examples": [{"ids": i, "reference": a, "ours": b} for i, a, b in dec_diff[:5]],
            "reference": {k: r[k] for k in ("transformers", "class", "eos", "pad", "padding_side")},
            "ours": {k: o[k] for k in ("transformers", "class", "eos", "pad", "padding_side")}}


# --- statistics and report -------------------------------------------------------------------------
def spearman(a: list[float], b: list[float]) -> float:
    try:
        from scipy.stats import spearmanr

        return float(spearmanr(a, b).statistic)
    except ImportError:
        def ranks(x):
            order = sorted(range(len(x)), key=lambda i: x[i])
            r = [0.0] * len(x)
            i = 0
            while i < len(x):
                j = i
                while j + 1 < len(x) and x[order[j + 1]] == x[order[i]]:
                    j += 1
                for k in range(i, j + 1):
                    r[order[k]] = (i + j) / 2 + 1
                i = j + 1
            return r

        ra, rb = ranks(a), ranks(b)
        ma, mb = statistics.fmean(ra), statistics.fmean(rb)
        num = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
        den = math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))
        return num / den if den else float("nan")


def stats(values: list[float]) -> dict:
    v = [x for x in values if x is not None]
    if not v:
        return {"mean": float("nan"), "std": float("nan"), "range": float("nan"), "values": values}
    return {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0,
            "range": max(v) - min(v), "values": values}


def f3(x: float) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.3f}"


def answer_profile(preds: list[str], valid: set[str]) -> dict:
    """How each side's answers look: distinct strings and the share that is a valid label verbatim."""
    return {"distinct": len(set(preds)), "valid_share": (sum(p in valid for p in preds) / len(preds)) if preds else None,
            "examples": sorted(set(preds))[:6]}


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def versions(args) -> dict:
    import torch
    import transformers
    from bench_reference import reference_commit

    probe = ("import json, torch, transformers, peft; print(json.dumps({'torch': torch.__version__, "
             "'transformers': transformers.__version__, 'peft': peft.__version__}))")
    proc = subprocess.run([args.reference_python, "-c", probe], capture_output=True, text=True)
    ref = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else {"error": proc.stderr[-300:]}
    try:
        import peft

        ours_peft = peft.__version__
    except ImportError:
        ours_peft = None
    ours_commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                 text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return {"reference": {"commit": reference_commit(Path(args.reference_src)), **ref},
            "ours": {"commit": ours_commit + ("+dirty" if dirty else ""), "torch": torch.__version__,
                     "transformers": transformers.__version__, "peft": ours_peft},
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}}


def main(argv=None) -> int:
    from bench_reference import add_reference_args, reference_found

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_reference_args(p)
    p.add_argument("--out", type=Path, default=Path("fidelity_out"), help="work and output folder (reused)")
    p.add_argument("--only", choices=("both", "ours", "reference"), default="both",
                   help="run one side; the other side's results are read from --out when present")
    p.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="training seeds, comma list")
    p.add_argument("--encoders", default="mel-fine,mel-coarse,raw-proj,noisy-mel", help="comma list (encoders.py)")
    p.add_argument("--steps", type=int, default=1600, help="training steps, both sides (400: both still far from converged)")
    p.add_argument("--warmup", type=int, help="warmup_steps in the train YAML, both sides [default: steps // 10]")
    p.add_argument("--train-clips", type=int, default=160, help="training clips per task")
    p.add_argument("--test-clips", type=int, default=48, help="test clips per task")
    p.add_argument("--lr", type=float, default=1e-3,
                   help="learning_rate in the train YAML, both sides (the reference's default 1e-4 learns too little "
                        "in a few hundred steps for the encoders to differ)")
    p.add_argument("--quick", action="store_true", help="smoke size: 64 steps, 48/16 clips per task, 2 seeds")
    p.add_argument("--ref-jobs", type=int, default=2,
                   help="reference runs in parallel (each uses 1 torch thread, its default)")
    p.add_argument("--ref-train-workers", type=int, default=4, help="num_training_workers (the reference's README)")
    p.add_argument("--ref-eval-batch", type=int, default=4, help="eval batch_size (the reference's README)")
    p.add_argument("--ours-threads", type=int, help="--threads for xares-eval run [default: its own]")
    p.add_argument("--fresh-ours", action="store_true", help="delete <out>/ours (features, runs) first")
    if p.parse_known_args(argv)[0].quick:
        p.set_defaults(steps=64, train_clips=48, test_clips=16, seeds="42,43", out=Path("fidelity_out_quick"))
    args = p.parse_args(argv)
    if not reference_found(args, "fidelity"):
        return 2
    from bench_reference import LAUNCHER_SOURCE, portable_decoder

    from evaluator.smoke_decoder import build_smoke_decoder

    spec = importlib.util.spec_from_file_location(ENCODER_MODULE, HERE / "encoders.py")
    enc_mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(enc_mod)
    names = [n.strip() for n in args.encoders.split(",") if n.strip()]
    unknown = [n for n in names if n not in enc_mod.ENCODERS]
    if unknown:
        p.error(f"unknown encoders {unknown}; known: {list(enc_mod.ENCODERS)}")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    steps, warmup = args.steps, args.warmup if args.warmup is not None else max(1, args.steps // 10)
    t_start = time.perf_counter()
    work = args.out.resolve()
    work.mkdir(parents=True, exist_ok=True)
    if args.fresh_ours and args.only != "reference":
        shutil.rmtree(work / "ours", ignore_errors=True)
        shutil.rmtree(work / "ours-logs", ignore_errors=True)

    say(f"data: {args.train_clips} training / {args.test_clips} test clips per task ...")
    layout = make_data(work / "data", args.train_clips, args.test_clips)
    texts = all_texts(layout)
    decoder = work / "decoder"
    if not (decoder / "config.json").is_file():
        build_smoke_decoder(sorted(set(texts)), decoder, threads=1)
        portable_decoder(decoder)
    cfgs = write_configs(work / "configs", layout, steps, warmup, args)
    (work / "enc").mkdir(exist_ok=True)
    shutil.copyfile(HERE / "encoders.py", work / "enc" / f"{ENCODER_MODULE}.py")
    (work / "ref_launcher.py").write_text(LAUNCHER_SOURCE)
    (work / "ref_wrapper.py").write_text(WRAPPER_SOURCE)

    ref_key = reference_key(cfgs, decoder, steps)
    ref_root = work / "reference" / ref_key
    jobs = [(n, enc_mod.ENCODERS[n].__name__, s) for n in names for s in seeds]
    ref: dict = {}
    ours: dict = {}
    failures: list[str] = []

    def ref_job(job):
        n, cls, s = job
        run_dir = ref_root / f"{n}-seed{s}"
        cached = all((run_dir / Path(TRAIN_YAML).stem / cls / f"score_eval_{t}.yaml").is_file() for t in TASKS)
        if args.only == "ours" and not cached:
            return job, None
        try:
            return job, run_reference(args, work, cls, s, cfgs, decoder, steps, run_dir)
        except Exception as e:  # noqa: BLE001 - reported, the others go on
            failures.append(str(e))
            say(str(e))
            return job, None

    say(f"reference: {len(jobs)} runs ({args.ref_jobs} at a time), {steps} steps, warmup {warmup} ...")
    with ThreadPoolExecutor(max(1, args.ref_jobs)) as pool:
        for (n, cls, s), res in pool.map(ref_job, jobs):
            if res is not None:
                ref[(n, s)] = res
    if args.only != "reference":
        for n in names:
            say(f"ours: {n}: xares-submit build ...")
            try:
                tar = build_submission(work, n, enc_mod.ENCODERS[n].__name__)
            except Exception as e:  # noqa: BLE001
                failures.append(str(e))
                say(str(e))
                continue
            for s in seeds:
                try:
                    ours[(n, s)] = run_ours(args, work, n, tar, s, cfgs, decoder, steps)
                except Exception as e:  # noqa: BLE001
                    failures.append(str(e))
                    say(str(e))
    wall = time.perf_counter() - t_start

    # --- report ------------------------------------------------------------------------------------
    tasks = [f"eval_{t}" for t in TASKS]
    valid = {t: set() for t in tasks}
    for t in TASKS:
        for x in (list(PITCH) if t == "pitch" else [c for v in CAPTIONS.values() for c in v] if t == "captions"
                  else list(COLOURS) if t == "colours" else []):
            valid[f"eval_{t}"].add(x)
    for n_sources in (1, 2):
        import itertools

        for combo in itertools.combinations(SOURCES, n_sources):
            valid["eval_mixture"].add(";".join(combo))
    rows, per_encoder = [], {}
    for n in names:
        per_encoder[n] = {"reference": [], "ours": []}
        for t in tasks:
            r = stats([ref[(n, s)][t]["score"] if (n, s) in ref else None for s in seeds])
            o = stats([ours[(n, s)][t]["score"] if (n, s) in ours and t in ours[(n, s)] else None for s in seeds])
            diff = o["mean"] - r["mean"]
            rn = sorted({ref[(n, s)][t]["n"] for s in seeds if (n, s) in ref})
            on = sorted({ours[(n, s)][t]["n"] for s in seeds if (n, s) in ours and t in ours[(n, s)]})
            rp = [x for s in seeds if (n, s) in ref for x in ref[(n, s)][t]["predict"]]
            op = [x for s in seeds if (n, s) in ours and t in ours[(n, s)] for x in ours[(n, s)][t]["predict"]]
            rows.append({"task": t, "encoder": n, "reference": r, "ours": o, "diff": diff,
                         "within_ref_spread": bool(abs(diff) <= r["range"] + 1e-12) if math.isfinite(diff) else None,
                         "n_samples": {"reference": rn, "ours": on},
                         "answers": {"reference": answer_profile(rp, valid[t]), "ours": answer_profile(op, valid[t])}})
        for side, table in (("reference", ref), ("ours", ours)):
            per_seed = [statistics.fmean(table[(n, s)][t]["score"] for t in tasks) for s in seeds
                        if (n, s) in table and all(t in table[(n, s)] for t in tasks)]
            per_encoder[n][side] = per_seed
    means = {n: {side: (statistics.fmean(v) if v else float("nan")) for side, v in d.items()}
             for n, d in per_encoder.items()}
    complete = [n for n in names if all(math.isfinite(means[n][s]) for s in ("reference", "ours"))]
    rho = spearman([means[n]["reference"] for n in complete], [means[n]["ours"] for n in complete]) \
        if len(complete) >= 2 else float("nan")
    notes = sorted({x for v in ref.values() for x in v.get("_notes", [])})
    try:
        tok = tokenizer_check(args, work, decoder, texts + [x for v in list(ref.values()) + list(ours.values())
                                                             for t in tasks if t in v for x in v[t]["predict"]])
    except Exception as e:  # noqa: BLE001
        tok = {"error": repr(e)}
    command = shlex.join([sys.executable, *(sys.argv if argv is None else [__file__, *argv])])
    ref_seconds = [v["_seconds"] for v in ref.values() if v.get("_seconds")]
    our_seconds = [v["_seconds"] for v in ours.values()]
    doc = {"command": command, "wall_seconds": wall, "versions": versions(args),
           "settings": {"steps": steps, "warmup_steps": warmup, "learning_rate": args.lr, "seeds": seeds, "encoders": names,
                        "train_clips_per_task": args.train_clips, "test_clips_per_task": args.test_clips,
                        "ref_train_workers": args.ref_train_workers, "ref_eval_batch": args.ref_eval_batch,
                        "ref_jobs": args.ref_jobs, "reference_key": ref_key, "only": args.only},
           "rows": rows, "encoder_means": means, "encoder_means_per_seed": per_encoder,
           "spearman": rho, "tokenizer_check": tok, "reference_patches": notes, "failures": failures,
           "seconds_per_run": {"reference": ref_seconds, "ours": our_seconds}}
    (work / "fidelity.json").write_text(json.dumps(doc, indent=1, default=str))

    md = ["# Fidelity: XARES-LLM reference vs this evaluator\n",
          f"Command: `{command}`  ",
          f"Wall time: {wall / 60:.1f} min; {len(seeds)} seeds {seeds}, {steps} steps (warmup {warmup}, "
          f"learning rate {args.lr:g}), "
          f"{args.train_clips} training / {args.test_clips} test clips per task, {len(names)} encoders.  ",
          f"Versions: reference xares-llm {doc['versions']['reference'].get('commit')} (torch "
          f"{doc['versions']['reference'].get('torch')}, transformers {doc['versions']['reference'].get('transformers')}, "
          f"peft {doc['versions']['reference'].get('peft')}); ours {doc['versions']['ours']['commit']} (torch "
          f"{doc['versions']['ours']['torch']}, transformers {doc['versions']['ours']['transformers']}, peft "
          f"{doc['versions']['ours']['peft']}).\n",
          "| task | encoder | reference mean ± std | ref. max-min | ours mean ± std | ours max-min | ours - ref "
          "| within ref. spread | samples ref / ours |",
          "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        r, o = row["reference"], row["ours"]
        within = {True: "yes", False: "**no**", None: "n/a"}[row["within_ref_spread"]]
        md.append(f"| {row['task']} | {row['encoder']} | {f3(r['mean'])} ± {f3(r['std'])} | {f3(r['range'])} | "
                  f"{f3(o['mean'])} ± {f3(o['std'])} | {f3(o['range'])} | {'+' if row['diff'] > 0 else ''}"
                  f"{f3(row['diff'])} | {within} | {row['n_samples']['reference']} / {row['n_samples']['ours']} |")
    md += ["", "| encoder | reference mean (per seed) | ours mean (per seed) |", "|---|---|---|"]
    for n in names:
        md.append(f"| {n} | {f3(means[n]['reference'])} ({', '.join(f3(x) for x in per_encoder[n]['reference'])}) | "
                  f"{f3(means[n]['ours'])} ({', '.join(f3(x) for x in per_encoder[n]['ours'])}) |")
    md += ["", f"Spearman rank correlation of the encoders' mean scores, reference vs ours: **{f3(rho)}** "
           f"({len(complete)} encoders).", ""]
    within = [row["within_ref_spread"] for row in rows if row["within_ref_spread"] is not None]
    md.append(f"Cells within the reference's own seed spread: {sum(within)}/{len(within)}.")
    if isinstance(tok, dict) and "error" not in tok:
        md.append(f"Tokenizer: {tok['texts']} texts encoded, {tok['id_sequences']} random id sequences decoded "
                  f"(skip_special_tokens) under transformers {tok['reference']['transformers']} and "
                  f"{tok['ours']['transformers']}: {tok['encode_differs']} encodings and {tok['decode_differs']} "
                  f"decodings differ.")
    else:
        md.append(f"Tokenizer check failed: {tok}")
    if notes:
        md.append("Reference run-time patches: " + "; ".join(notes) + ".")
    if failures:
        md += ["", "Failures:", *[f"- {f.splitlines()[0]}" for f in failures]]
    (work / "fidelity.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
