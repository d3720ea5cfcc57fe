"""How far our audio/feature pipeline is from the XARES-LLM reference's, measured (not argued).

Four places where this evaluator deliberately differs from xiaomi-research/xares-llm, each measured on
small synthetic inputs with real ``transformers`` encoders built with random weights (the zoo shapes in
``tests/zoo/``) and a log-mel front-end in plain torch:

``resample``   soxr HQ (ours, ``evaluator/data/audio.py``) against ``torchaudio.functional.resample``
               (the reference's, default sinc_interp_hann, width 6, rolloff 0.99), run in the reference's
               own venv in a subprocess; waveform SNR, length, band gains, and the difference it makes to
               log-mel and encoder features, next to a yardstick (white noise added at 60 dB SNR) and to
               float16 storage.
``crop``       random crop of long training clips: the reference crops the AUDIO before the encoder, we
               crop stored FEATURE frames; encode(audio[a:b]) against encode(audio)[frames of a:b],
               separately for frames near the crop edges and for interior frames.
``trainmode``  the reference's Trainer runs the frozen encoder in training mode (dropout, LayerDrop,
               SpecAugment masking, BatchNorm batch statistics); we encode in eval mode.
``positions``  the reference right-pads audio in a batch and passes no position ids while training, so a
               row's text starts at the longest clip's frame count; a simulation of that gap.

Each prints a markdown table and writes ``<out>/<name>.json``::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/fidelity/audio_features.py all --out /tmp/fidelity
    .venv/bin/python benchmarks/fidelity/audio_features.py resample --rates 44100 48000 --seconds 2
    .venv/bin/python benchmarks/fidelity/audio_features.py crop --clip-seconds 90 --crop-seconds 30 \\
        --encoders whisper logmel --window-seconds 30

The resample measurement needs the reference venv (``benchmarks/setup_reference.sh``):
``--reference-python`` (default ``$XARES_REF_PYTHON`` or /tmp/xares-ref-venv/bin/python). Its torchaudio
native library may not load with a CPU-only torch; the subprocess then stubs ``torchaudio._extension``
with ``bench_reference.LAUNCHER_SOURCE``'s own helper (the pure-torch resample does not need it).
"""

from __future__ import annotations

import argparse
import ast
import functools
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import wave
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import soxr  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SR = 16_000
ZOO = ROOT / "tests" / "zoo"
BENCH = ROOT / "benchmarks"


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
def load_module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def rel_l2(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    """||a - b|| / ||b||."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def mean_cos(a: np.ndarray, b: np.ndarray) -> float:
    """Mean cosine similarity of matching frames ([T, D])."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    num = (a * b).sum(-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return float(np.mean(num / np.maximum(den, 1e-30)))


def snr_db(ref: np.ndarray, other: np.ndarray) -> float:
    err = np.sum((other.astype(np.float64) - ref) ** 2)
    return float(10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / max(err, 1e-300)))


def add_noise(x: np.ndarray, snr: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    p = float(np.mean(x.astype(np.float64) ** 2))
    return (x + rng.standard_normal(x.shape) * np.sqrt(p / 10 ** (snr / 10))).astype(np.float32)


def fmt(v, nd=3) -> str:
    if isinstance(v, str):
        return v
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "–"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if v == 0:
        return "0"
    if float(v).is_integer() and abs(v) < 1e6:
        return str(int(v))
    if abs(v) >= 1000 or abs(v) < 1e-3:
        return f"{v:.2e}"
    return f"{v:.{nd}g}"


def table(headers: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def write_json(out: Path, name: str, payload: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(payload, indent=1, default=float))


@functools.lru_cache(maxsize=4)
def _espeak(text: str) -> tuple[np.ndarray, int]:
    raw = subprocess.run(["espeak-ng", "-s", "160", "--stdout", text], capture_output=True, check=True).stdout
    with wave.open(io.BytesIO(raw)) as w:
        return np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768, w.getframerate()


def speech(seconds: float, sr: int, seed: int = 0) -> np.ndarray:
    """espeak-ng speech (22050 Hz), looped to ``seconds``, brought to ``sr`` with soxr VHQ (the same
    input for both resamplers; how it was made does not matter). Falls back to a buzzy vowel-like signal
    when espeak-ng is missing."""
    text = ("The quick brown fox jumps over the lazy dog. A large audio language model listens to "
            "speech, music and the sounds of the city, then answers in words.")
    if shutil.which("espeak-ng"):
        x, rate = _espeak(text)
    else:  # pragma: no cover - espeak-ng is a project dependency
        rate = 22050
        t = np.arange(int(seconds * rate)) / rate
        f0 = 120 + 20 * np.sin(2 * np.pi * 0.5 * t)
        x = (0.3 * np.sign(np.sin(2 * np.pi * np.cumsum(f0) / rate)) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)))
        x = x.astype(np.float32)
    if rate != sr:
        x = soxr.resample(x, rate, sr, quality="VHQ").astype(np.float32)
    n = int(seconds * sr)
    reps = int(np.ceil(n / len(x)))
    x = np.tile(x, reps)[:n]
    x = 0.5 * x / max(np.abs(x).max(), 1e-9)
    # a recording's noise floor (~ -75 dBFS): espeak-ng's digital silence would make any log-mel
    # feature swing on the slightest change (log of ~0), which no real clip does
    floor = 1.5e-4 * np.random.default_rng(seed + 100).standard_normal(n)
    return (x + floor).astype(np.float32)


def make_signal(kind: str, seconds: float, sr: int, seed: int = 0) -> np.ndarray:
    n = int(round(seconds * sr))
    t = np.arange(n) / sr
    rng = np.random.default_rng(seed)
    if kind == "noise":
        return (0.1 * rng.standard_normal(n)).astype(np.float32)
    if kind == "speech":
        return speech(seconds, sr, seed)
    if kind == "chirp":  # log sweep 50 Hz -> 0.45 * sr
        f0, f1 = 50.0, 0.45 * sr
        k = np.log(f1 / f0) / seconds
        return (0.3 * np.sin(2 * np.pi * f0 * (np.exp(k * t) - 1) / k)).astype(np.float32)
    if kind == "tones":  # near the top of the 16 kHz band (or of the source band when it is lower)
        top = min(8000.0, sr / 2)
        freqs = [top - 1000, top - 500, top - 250, top - 100]
        x = sum(np.sin(2 * np.pi * f * t + i) for i, f in enumerate(freqs))
        return (0.2 * x / len(freqs)).astype(np.float32)
    if kind == "scene":  # speech over pink-ish noise with a few clicks: an environmental-looking clip
        x = 0.5 * speech(seconds, sr)[:n]
        x = np.pad(x, (0, n - len(x)))
        pink = np.cumsum(rng.standard_normal(n)) * 0.002
        pink -= np.convolve(pink, np.ones(801) / 801, mode="same")
        x = x + pink
        for c in rng.integers(0, n - 200, size=max(1, int(seconds))):
            x[c : c + 200] += 0.3 * np.exp(-np.arange(200) / 30) * rng.standard_normal(200)
        return x.astype(np.float32)
    raise ValueError(kind)


# --------------------------------------------------------------------------------------------------
# encoders
# --------------------------------------------------------------------------------------------------
class LogMel(torch.nn.Module):
    """80-band Slaney log-mel, 25 ms Hann window, 10 ms hop (centred, reflect padding), ln(mel + 1e-6)."""

    hop = 160

    def __init__(self, n_fft: int = 400, n_mels: int = 80):
        super().__init__()
        from transformers.audio_utils import mel_filter_bank

        fb = mel_filter_bank(num_frequency_bins=n_fft // 2 + 1, num_mel_filters=n_mels, min_frequency=0.0,
                             max_frequency=SR / 2, sampling_rate=SR, norm="slaney", mel_scale="slaney")
        self.register_buffer("fb", torch.from_numpy(fb).float())
        self.register_buffer("window", torch.hann_window(n_fft))
        self.n_fft = n_fft
        # centre frequency of each band (Hz), for the below-7-kHz split
        freqs = np.linspace(0, SR / 2, n_fft // 2 + 1)
        self.centres = (freqs[:, None] * fb).sum(0) / np.maximum(fb.sum(0), 1e-12)
        self.output_dim = n_mels

    def forward(self, audio, audio_attention_mask=None):
        if audio.ndim == 1:
            audio = audio[None]
        spec = torch.stft(audio, self.n_fft, self.hop, window=self.window, return_complex=True).abs() ** 2
        feats = torch.log(spec.transpose(1, 2) @ self.fb + 1e-6)  # [B, T, M]
        return feats, None


def zoo_encoder(name: str) -> tuple[torch.nn.Module, int]:
    """(module in eval mode, hop in samples) of a zoo entry or the log-mel."""
    if name == "logmel":
        return LogMel().eval(), 160
    if name == "benchmel":  # benchmarks/bench_encoder.py: 25 frames/s log-mel + linear map
        mod = load_module(BENCH / "bench_encoder.py", "bench_encoder_mod")
        return mod.BenchLogMelEncoder().eval(), 640
    files = {"whisper": ("whisper", "WhisperTrimmedEncoder"), "whisper_fixed": ("whisper_fixed", "WhisperFixedEncoder"),
             "wavlm": ("wavlm", "WavLMBasePlusEncoder"), "wav2vec2": ("wav2vec2", "Wav2Vec2BaseEncoder")}
    folder, cls = files[name]
    mod = load_module(ZOO / folder / "encoder.py", f"zoo_{folder}")
    return getattr(mod, cls)().eval(), 320


@torch.no_grad()
def encode(enc: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    """[S] float32 -> [T, D] float32 (frames past the returned mask dropped)."""
    feats, mask = enc(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None])
    f = feats[0]
    if mask is not None:
        f = f[: int(mask[0].sum())]
    return f.float().numpy()


# --------------------------------------------------------------------------------------------------
# 1. resampling
# --------------------------------------------------------------------------------------------------
def launcher_head() -> str:
    """The torchaudio-importing helpers of bench_reference.LAUNCHER_SOURCE (definitions only)."""
    try:
        sys.path.insert(0, str(BENCH))
        from bench_reference import LAUNCHER_SOURCE  # noqa: PLC0415
    except Exception:  # evaluator being edited: read the constant without importing the module
        tree = ast.parse((BENCH / "bench_reference.py").read_text())
        LAUNCHER_SOURCE = next(
            ast.literal_eval(n.value) for n in tree.body
            if isinstance(n, ast.Assign) and any(getattr(t, "id", "") == "LAUNCHER_SOURCE" for t in n.targets))
    finally:
        if sys.path and sys.path[0] == str(BENCH):
            sys.path.pop(0)
    head = LAUNCHER_SOURCE.split("\nta = import_torchaudio()")[0]
    if "def import_torchaudio" not in head:
        raise RuntimeError("bench_reference.LAUNCHER_SOURCE no longer defines import_torchaudio()")
    return head


REF_RESAMPLE = """
import sys, numpy as np
ta = import_torchaudio()
import torch
torch.set_num_threads(1)
from torchaudio.functional import resample
src = np.load(sys.argv[1])
out = {}
for k in src.files:
    sr = int(k.split("|")[0])
    out[k] = resample(torch.from_numpy(src[k]), sr, 16000).numpy()
np.savez(sys.argv[2], **out)
print("torch", torch.__version__, "torchaudio", ta.__version__)
"""


def torchaudio_resample(inputs: dict[str, np.ndarray], ref_python: str) -> tuple[dict[str, np.ndarray], str]:
    """Resample every ``"<sr>|name"`` input to 16 kHz with the reference venv's torchaudio."""
    with tempfile.TemporaryDirectory() as d:
        src, dst, script = Path(d) / "in.npz", Path(d) / "out.npz", Path(d) / "ref_resample.py"
        np.savez(src, **inputs)
        script.write_text(launcher_head() + "\n" + REF_RESAMPLE)
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        p = subprocess.run([ref_python, str(script), str(src), str(dst)], capture_output=True, text=True, env=env)
        if p.returncode != 0:
            raise RuntimeError(f"reference resample failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
        with np.load(dst) as z:
            return {k: z[k] for k in z.files}, p.stdout.strip().splitlines()[-1]


def tone_level(y: np.ndarray, f: float, sr: int = SR) -> float:
    """Amplitude of the component at frequency f in y (Hann-windowed single-bin DFT, 0.1 s ends cut)."""
    y = y[sr // 10 : -sr // 10].astype(np.float64)
    w = np.hanning(len(y))
    t = np.arange(len(y)) / sr
    return float(2 * np.abs(np.sum(y * w * np.exp(-2j * np.pi * f * t))) / w.sum())


def band_gains(sr: int, freqs: list[float], ref_python: str, seconds: float = 1.0) -> list[dict]:
    """For a 0.5-amplitude tone at f: the level (dB re the tone) at f in the 16 kHz output (the passband
    gain; f < 8 kHz) and at its mirror (aliasing when downsampling: 16000 - f for f > 8 kHz; imaging when
    upsampling from 8 kHz: 8000 - f, i.e. the part of the 4-8 kHz band that should stay empty)."""
    inputs, t = {}, np.arange(int(seconds * sr)) / sr
    for f in freqs:
        if f < sr / 2:
            inputs[f"{sr}|{f}"] = (0.5 * np.sin(2 * np.pi * f * t)).astype(np.float32)
    ta, _ = torchaudio_resample(inputs, ref_python)
    rows = []
    for k, x in inputs.items():
        f = float(k.split("|")[1])
        ours = soxr.resample(x, sr, SR, quality="HQ")
        mirror = (16000 - f) if f > 8000 else (8000 - f if sr == 8000 else None)
        row = {"sr": sr, "freq": f, "mirror": mirror}
        for side, y in (("soxr", ours), ("torchaudio", ta[k])):
            row[f"{side}_gain_db"] = 20 * np.log10(tone_level(y, f) / 0.5 + 1e-12) if f < 8000 else None
            row[f"{side}_mirror_db"] = 20 * np.log10(tone_level(y, mirror) / 0.5 + 1e-12) if mirror else None
        rows.append(row)
    return rows


def measure_resample(args) -> dict:
    torch.set_num_threads(args.threads)
    signals, rates, seconds = args.signals, args.rates, args.seconds
    inputs = {f"{sr}|{s}": make_signal(s, seconds, sr, seed=1) for sr in rates for s in signals}
    odd = {f"{sr}|len{n}": np.zeros(n, np.float32) for sr in rates for n in (sr + 1, sr + 7, sr + 13, 12345, 3 * sr + 5)}
    t0 = time.time()
    ta_out, ref_versions = torchaudio_resample({**inputs, **odd}, args.reference_python)
    lengths = [{"sr": int(k.split("|")[0]), "n": len(v), "soxr": len(soxr.resample(v, int(k.split("|")[0]), SR, quality="HQ")),
                "torchaudio": len(ta_out[k])} for k, v in odd.items()]
    encoders = {name: zoo_encoder(name)[0] for name in args.encoders}
    logmel = encoders.get("logmel") or LogMel().eval()
    rows = []
    for key, x in inputs.items():
        sr, sig = int(key.split("|")[0]), key.split("|")[1]
        ours = soxr.resample(x, sr, SR, quality="HQ").astype(np.float32)
        ref = ta_out[key].astype(np.float32)
        n = min(len(ours), len(ref))
        o, r = ours[:n], ref[:n]
        edge = SR // 100  # 10 ms
        row = {"sr": sr, "signal": sig, "len_ours": len(ours), "len_ref": len(ref), "len_diff": len(ours) - len(ref),
               "snr_db": snr_db(r, o), "snr_db_interior": snr_db(r[edge:-edge], o[edge:-edge]),
               "max_abs": float(np.abs(o - r).max()), "ref_peak": float(np.abs(r).max())}
        noisy, noisy20 = add_noise(r, 60.0, seed=7), add_noise(r, 20.0, seed=7)
        for name, enc in encoders.items():
            fr, fo, fn, fn20 = encode(enc, r), encode(enc, o), encode(enc, noisy), encode(enc, noisy20)
            t = min(len(fr), len(fo), len(fn))
            fr, fo, fn, fn20 = fr[:t], fo[:t], fn[:t], fn20[:t]
            row[f"{name}_rel"] = rel_l2(fo, fr)
            row[f"{name}_rel_noise60"] = rel_l2(fn, fr)
            row[f"{name}_rel_noise20"] = rel_l2(fn20, fr)
            row[f"{name}_rel_fp16"] = rel_l2(fr.astype(np.float16), fr)
            if name == "logmel":  # bands inside both resamplers' flat passband (7 kHz; 3.5 kHz from 8 kHz)
                low = logmel.centres < 0.875 * min(sr, SR) / 2
                row["logmel_rel_below7k"] = rel_l2(fo[:, low], fr[:, low])
                row["logmel_rel_noise60_below7k"] = rel_l2(fn[:, low], fr[:, low])
        rows.append(row)
    gains = []
    if args.band_gains:
        for sr in [r for r in (8000, 44100) if r in rates] or rates[-1:]:
            tones = [2000, 3000, 3500, 3800, 3900, 3960] if sr == 8000 else \
                [6000, 7000, 7300, 7500, 7700, 7900, 8100, 8500, 9000, 10000]
            gains += band_gains(sr, tones, args.reference_python)
    def cell(r, k, y):
        q = r[k] / max(r[y], 1e-30)
        return f"{fmt(r[k])} ({q:.0f}×)" if q >= 10 else f"{fmt(r[k])} ({q:.1f}×)"

    headers = ["sr", "signal", "Δlen", "SNR dB", "SNR dB (no 10 ms ends)", "max |Δ|"]
    body = [[r["sr"], r["signal"], r["len_diff"], r["snr_db"], r["snr_db_interior"], r["max_abs"]] for r in rows]
    for name in args.encoders:
        headers += [f"{name} rel (× 60 dB)", f"{name} 20 dB"]
        for line, r in zip(body, rows):
            line += [cell(r, f"{name}_rel", f"{name}_rel_noise60"), r[f"{name}_rel_noise20"]]
        if name == "logmel":
            headers += ["logmel <0.875·Nyquist rel (× 60 dB)"]
            for line, r in zip(body, rows):
                line += [cell(r, "logmel_rel_below7k", "logmel_rel_noise60_below7k")]
    dl = [r["soxr"] - r["torchaudio"] for r in lengths]
    print(f"\nOutput length, {len(lengths)} odd input lengths: soxr - torchaudio in [{min(dl)}, {max(dl)}] samples "
          "(soxr rounds the exact length, torchaudio takes its ceiling)")
    print(f"\n### Resampling: soxr HQ vs torchaudio ({ref_versions}), {seconds} s clips\n")
    print(table(headers, body))
    print("\n60 dB-noise yardstick (rel L2) per encoder, median over rows: " + ", ".join(
        f"{n} {np.median([r[f'{n}_rel_noise60'] for r in rows]):.2e}" for n in args.encoders)
        + "; float16 storage: " + ", ".join(f"{n} {np.median([r[f'{n}_rel_fp16'] for r in rows]):.2e}"
                                           for n in args.encoders))
    if gains:
        print("\nTone through each resampler: level at f and at its mirror (alias/image), dB re the tone\n")
        print(table(["sr", "tone Hz", "soxr gain", "torchaudio gain", "mirror Hz", "soxr mirror", "torchaudio mirror"],
                    [[g["sr"], g["freq"], g["soxr_gain_db"], g["torchaudio_gain_db"], g["mirror"],
                      g["soxr_mirror_db"], g["torchaudio_mirror_db"]] for g in gains]))
    res = {"seconds": seconds, "reference": ref_versions, "rows": rows, "band_gains": gains, "lengths": lengths,
           "wall_s": time.time() - t0}
    write_json(args.out, "resample", res)
    return res


# --------------------------------------------------------------------------------------------------
# 2. cropping long clips: audio crop (reference) vs stored-feature crop (ours)
# --------------------------------------------------------------------------------------------------
def window_bounds(n: int, window_seconds: float | None) -> list[tuple[int, int]]:
    """The windows our extraction cuts a long clip into (evaluator.extraction.window_bounds)."""
    sys.path.insert(0, str(ROOT))
    try:
        from evaluator.extraction import window_bounds as ours  # noqa: PLC0415
    finally:
        sys.path.remove(str(ROOT))
    return ours(n, window_seconds)


def encode_windowed(enc, x: np.ndarray, window_seconds: float | None) -> np.ndarray:
    return np.concatenate([encode(enc, x[a:b]) for a, b in window_bounds(len(x), window_seconds)])


def measure_crop(args) -> dict:
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    clip_s, crop_s, edge_s = args.clip_seconds, args.crop_seconds, args.edge_seconds
    clips = {s: make_signal(s, clip_s, SR, seed=3) for s in args.crop_signals}
    rows, t0 = [], time.time()
    for name in args.encoders:
        enc, hop = zoo_encoder(name)
        win = args.window_seconds if name in ("whisper", "whisper_fixed") else None
        if name == "whisper_fixed":
            print("(whisper_fixed skipped: its 1500 frames per call make an audio crop and a frame crop "
                  "incomparable; our runner crops it by whole windows, which is the same computation)")
            continue
        acc = {"edge_rel": [], "int_rel": [], "edge_cos": [], "int_cos": [], "all_rel": [], "noise_rel": [],
               "refshift_rel": []}
        for sig, x in clips.items():
            full = encode_windowed(enc, x, win)
            crop_n = int(crop_s * SR)
            crop_frames = round(crop_s * SR / hop)
            shift = crop_frames // 4
            for _ in range(args.crops):
                s = int(rng.integers(0, (len(x) - crop_n) // hop - shift + 1))  # a frame-aligned crop start
                a = s * hop
                fc = encode(enc, x[a : a + crop_n])  # the reference: crop the audio, then encode
                fo = full[s : s + crop_frames]  # ours: crop the stored frames
                t = min(len(fc), len(fo))
                fc, fo = fc[:t], fo[:t]
                fn = encode(enc, add_noise(x[a : a + crop_n], 60.0, seed=11))[:t]
                e = max(1, int(round(edge_s * SR / hop)))
                edge = np.zeros(t, bool)
                edge[:e] = edge[-e:] = True
                acc["edge_rel"].append(rel_l2(fo[edge], fc[edge]))
                acc["int_rel"].append(rel_l2(fo[~edge], fc[~edge]) if (~edge).any() else float("nan"))
                acc["edge_cos"].append(mean_cos(fo[edge], fc[edge]))
                acc["int_cos"].append(mean_cos(fo[~edge], fc[~edge]) if (~edge).any() else float("nan"))
                acc["all_rel"].append(rel_l2(fo, fc))
                acc["noise_rel"].append(rel_l2(fn, fc))
                # the reference's own spread: the same frames from another of its crops (a quarter crop
                # later), compared on the frames both crops hold away from their edges
                f2 = encode(enc, x[a + shift * hop : a + shift * hop + crop_n])
                lo, hi = shift + e, min(t, len(f2) + shift) - e
                if hi > lo:
                    acc["refshift_rel"].append(rel_l2(f2[lo - shift : hi - shift], fc[lo:hi]))
        row = {"encoder": name, "window_s": win, **{k: float(np.nanmean(v)) for k, v in acc.items()},
               "int_rel_max": float(np.nanmax(acc["int_rel"])), "n": len(acc["all_rel"])}
        rows.append(row)
    print(f"\n### Cropping: encode(audio[a:b]) vs encode(audio)[frames a:b]; {clip_s} s clips "
          f"({', '.join(args.crop_signals)}), {crop_s} s crops x {args.crops}, edge = first/last {edge_s} s\n")
    print(table(["encoder", "windows (s)", "rel L2 edge", "rel L2 interior", "(max)", "cos edge", "cos interior",
                 "rel L2 all", "60 dB noise", "ref crop vs ref crop", "crops"],
                [[r["encoder"], r["window_s"] or "whole clip", r["edge_rel"], r["int_rel"], r["int_rel_max"],
                  r["edge_cos"], r["int_cos"], r["all_rel"], r["noise_rel"], r["refshift_rel"], r["n"]] for r in rows]))
    print("\n'ref crop vs ref crop': the reference against itself, the same frames from two of its crops a "
          "quarter crop apart (interior of both)")
    res = {"clip_seconds": clip_s, "crop_seconds": crop_s, "edge_seconds": edge_s, "rows": rows,
           "wall_s": time.time() - t0}
    write_json(args.out, f"crop_{clip_s:g}s_{crop_s:g}s", res)
    return res


# --------------------------------------------------------------------------------------------------
# 3. train-mode encoding
# --------------------------------------------------------------------------------------------------
def hf_train_variant(name: str, layers: int, keep: str) -> torch.nn.Module:
    """A zoo WavLM / wav2vec2 shape (``layers`` deep) with the dropout, LayerDrop and SpecAugment settings
    a pretrained checkpoint's config carries; ``keep="dropout"`` turns LayerDrop and SpecAugment off."""
    from transformers import Wav2Vec2Config, Wav2Vec2Model, WavLMConfig, WavLMModel

    enc, _ = zoo_encoder(name)
    inner = enc.wavlm if name == "wavlm" else enc.wav2vec2
    cfg_cls, model_cls = (WavLMConfig, WavLMModel) if name == "wavlm" else (Wav2Vec2Config, Wav2Vec2Model)
    d = inner.config.to_dict()
    # the training-time settings of the public checkpoints' configs (microsoft/wavlm-base-plus,
    # facebook/wav2vec2-base); the zoo builds its encoders with all of them off
    d.update(hidden_dropout=0.1, attention_dropout=0.1, activation_dropout=0.0, feat_proj_dropout=0.1,
             layerdrop=0.05 if name == "wavlm" else 0.1, apply_spec_augment=True, mask_time_prob=0.05,
             mask_time_length=10, mask_time_min_masks=2, mask_feature_prob=0.0)
    if keep == "dropout":
        d["layerdrop"], d["apply_spec_augment"] = 0.0, False
    d["num_hidden_layers"] = layers
    torch.manual_seed(0)
    model = model_cls(cfg_cls.from_dict(d))
    return model


class BNEncoder(torch.nn.Module):
    """A small conv + BatchNorm encoder (20 ms hop, 64 dims), as CNN audio taggers are built."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1 = torch.nn.Conv1d(1, 64, 400, stride=160, padding=200)
        self.b1 = torch.nn.BatchNorm1d(64)
        self.c2 = torch.nn.Conv1d(64, 64, 3, stride=2, padding=1)
        self.b2 = torch.nn.BatchNorm1d(64)
        self.c3 = torch.nn.Conv1d(64, 64, 3, padding=1)
        self.b3 = torch.nn.BatchNorm1d(64)
        self.output_dim = 64

    def forward(self, audio, audio_attention_mask=None):
        x = audio[:, None]
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        x = self.b3(self.c3(x))
        return x.transpose(1, 2), None


def bn_state(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in m.state_dict().items() if "running" in k}


def padded_batch(rng, seconds_range, n, kind) -> tuple[torch.Tensor, list[int]]:
    lens = [int(rng.uniform(*seconds_range) * SR) for _ in range(n)]
    waves = [make_signal(kind, L / SR, SR, seed=int(rng.integers(1 << 30))) for L in lens]
    out = torch.zeros(n, max(lens))
    for i, w in enumerate(waves):
        out[i, : len(w)] = torch.from_numpy(w) * float(rng.uniform(0.3, 1.0))
    return out, [len(w) for w in waves]


@torch.no_grad()
def measure_trainmode(args) -> dict:
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    t0 = time.time()
    x = make_signal("scene", args.seconds, SR, seed=5)
    xt = torch.from_numpy(x)[None]
    noisy = torch.from_numpy(add_noise(x, 60.0, seed=9))[None]
    rows = []
    for name in ("wavlm", "wav2vec2"):
        for layers in args.layers:
            for keep in ("dropout", "all"):
                model = hf_train_variant(name, layers, keep)
                model.eval()
                ev = model(xt).last_hidden_state[0].numpy()
                ev_noise = model(noisy).last_hidden_state[0].numpy()
                model.train()
                runs = [model(xt).last_hidden_state[0].numpy() for _ in range(args.repeats)]
                rel = [rel_l2(r, ev) for r in runs]
                cos = [mean_cos(r, ev) for r in runs]
                c = model.config
                rows.append({"encoder": name, "layers": layers,
                             "train_mode": "dropout only" if keep == "dropout" else
                             f"dropout + layerdrop {c.layerdrop} + SpecAugment p={c.mask_time_prob}",
                             "dropouts": f"hid {c.hidden_dropout}, att {c.attention_dropout}, "
                                         f"act {c.activation_dropout}, proj {c.feat_proj_dropout}",
                             "rel_train_vs_eval": float(np.mean(rel)), "rel_train_vs_eval_max": float(np.max(rel)),
                             "cos_train_vs_eval": float(np.mean(cos)),
                             "rel_train_vs_train": rel_l2(runs[0], runs[1]) if len(runs) > 1 else float("nan"),
                             "rel_noise60": rel_l2(ev_noise, ev)})
    print(f"\n### Train-mode vs eval-mode encoding ({args.seconds} s clip, {args.repeats} train-mode passes)\n")
    print(table(["encoder", "layers", "train mode", "rel L2 train vs eval", "(max)", "cos", "train vs train",
                 "60 dB noise (eval)"],
                [[r["encoder"], r["layers"], r["train_mode"], r["rel_train_vs_eval"], r["rel_train_vs_eval_max"],
                  r["cos_train_vs_eval"], r["rel_train_vs_train"], r["rel_noise60"]] for r in rows]))
    print("\nDefault dropouts used: " + "; ".join(sorted({f"{r['encoder']}: {r['dropouts']}" for r in rows})))

    # BatchNorm: a "checkpoint" whose running statistics were settled on one distribution, then the
    # reference's training passes (train mode, padded batches of 4, another distribution) move them.
    bn_rows = []
    for task_kind, task_range in (("same", ("scene", (1.0, 4.0))), ("shifted", ("noise", (1.0, 10.0)))):
        enc = BNEncoder()
        enc.train()
        for _ in range(args.bn_settle):  # pretraining distribution: speech-like, 1-4 s
            b, _ = padded_batch(rng, (1.0, 4.0), 4, "scene")
            enc(b)
        enc.eval()
        ckpt = bn_state(enc)
        probe = torch.from_numpy(make_signal("scene", args.seconds, SR, seed=21))[None]
        probe_task = torch.from_numpy(make_signal(task_range[0], args.seconds, SR, seed=22))[None]
        ev0, ev0_task = enc(probe)[0][0].numpy(), enc(probe_task)[0][0].numpy()
        # train mode on a task batch vs eval mode, the same clip
        b, lens = padded_batch(rng, task_range[1], 4, task_range[0])
        enc.train()
        tr = enc(b)[0]
        enc.eval()
        evb = enc(b)[0]
        frames = [min(tr.shape[1], L // 320) for L in lens]
        rel_batch = float(np.mean([rel_l2(tr[i, : frames[i]].numpy(), evb[i, : frames[i]].numpy()) for i in range(4)]))
        enc.load_state_dict({**enc.state_dict(), **ckpt})
        drift = {}
        enc.train()
        done = 0
        for n in sorted(args.bn_steps):
            while done < n:
                b, _ = padded_batch(rng, task_range[1], 4, task_range[0])
                enc(b)
                done += 1
            enc.eval()
            st = bn_state(enc)
            drift[n] = {
                "rel_running_mean": rel_l2(torch.cat([st[k] for k in st if k.endswith("running_mean")]),
                                           torch.cat([ckpt[k] for k in ckpt if k.endswith("running_mean")])),
                "rel_running_var": rel_l2(torch.cat([st[k] for k in st if k.endswith("running_var")]),
                                          torch.cat([ckpt[k] for k in ckpt if k.endswith("running_var")])),
                "rel_eval_feats_pretrain_clip": rel_l2(enc(probe)[0][0].numpy(), ev0),
                "rel_eval_feats_task_clip": rel_l2(enc(probe_task)[0][0].numpy(), ev0_task),
            }
            enc.train()
        bn_rows.append({"task": f"{task_kind} ({task_range[0]}, {task_range[1][0]:g}-{task_range[1][1]:g} s)",
                        "rel_train_vs_eval_batch": rel_batch, "drift": drift})
    print(f"\nBatchNorm encoder (conv+BN x3); checkpoint statistics settled by {args.bn_settle} train-mode passes on "
          "speech-like 1-4 s clips; then the reference's passes (padded batches of 4) on the task data\n")
    hdr = ["task data", "train vs eval (batch)"]
    for n in sorted(args.bn_steps):
        hdr += [f"Δ mean @{n}", f"Δ var @{n}", f"eval feats Δ @{n} (task clip)"]
    body = []
    for r in bn_rows:
        line = [r["task"], r["rel_train_vs_eval_batch"]]
        for n in sorted(args.bn_steps):
            d = r["drift"][n]
            line += [d["rel_running_mean"], d["rel_running_var"], d["rel_eval_feats_task_clip"]]
        body.append(line)
    print(table(hdr, body))
    res = {"seconds": args.seconds, "rows": rows, "batchnorm": bn_rows, "wall_s": time.time() - t0}
    write_json(args.out, "trainmode", res)
    return res


# --------------------------------------------------------------------------------------------------
# 4. position gap of right-padded batches
# --------------------------------------------------------------------------------------------------
def durations(name: str, rng, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(clip durations in s, token counts of prompt + answer) of ``n`` simulated training samples. Rough
    public figures for the durations, guesses for the token counts; the mixed track is an assumption."""
    if name == "esc50":  # 5 s clips, labels of 1-6 tokens
        return np.full(n, 5.0), rng.integers(1, 7, n) + 8
    if name == "speechcommands":  # ~90 % exactly 1 s, the rest 0.4-1 s; one-word answers
        return np.where(rng.random(n) < 0.9, 1.0, rng.uniform(0.4, 1.0, n)), rng.integers(1, 4, n) + 6
    if name == "clotho":  # 15-30 s, captions of 8-20 words
        return rng.uniform(15.0, 30.0, n), rng.integers(10, 31, n) + 8
    if name == "librispeech":  # train-clean: mostly 10-16 s; transcripts ~4 tokens/s
        d = np.clip(rng.normal(12.5, 3.5, n), 1.0, 35.0)
        return d, np.round(d * rng.uniform(3, 5, n)).astype(int) + 8
    if name == "track1-mix":  # 15 tasks mixed per batch (RandomMix, the track's probs): 1 s keywords to 30 s music
        # (prob, duration sampler, prompt tokens, answer tokens (lo, hi))
        parts = [(1, lambda k: np.where(rng.random(k) < 0.9, 1.0, rng.uniform(0.4, 1.0, k)), 6, (1, 3)),  # SC
                 (2, lambda k: rng.uniform(1.5, 4.5, k), 13, (5, 15)),  # FluentSpeechCommands
                 (0.5, lambda k: np.full(k, 5.0), 7, (1, 6)), (3, lambda k: np.full(k, 4.0), 7, (1, 4)),  # ESC, NSynth
                 (2, lambda k: np.exp(rng.normal(np.log(5), 0.8, k)), 12, (2, 10)),  # FSDKaggle2018
                 (3, lambda k: np.exp(rng.normal(np.log(5), 0.8, k)), 10, (2, 20)),  # FSD50k
                 (2, lambda k: rng.uniform(4, 20, k), 11, (1, 2)), (1, lambda k: rng.uniform(1.3, 5, k), 9, (1, 3)),
                 (1, lambda k: rng.uniform(1, 6, k), 12, (1, 2)), (2, lambda k: np.full(k, 30.0), 10, (1, 4)),
                 (1, lambda k: rng.uniform(1, 4, k), 7, (1, 5)), (1, lambda k: np.full(k, 30.0), 7, (1, 3)),
                 (2, lambda k: rng.uniform(1, 8, k), 8, (1, 3)), (1, lambda k: np.full(k, 5.0), 9, (1, 2)),
                 (3, lambda k: rng.uniform(2, 20, k), 8, (1, 3))]
        w = np.array([p[0] for p in parts])
        which = rng.choice(len(parts), size=n, p=w / w.sum())
        d, tok = np.empty(n), np.empty(n, int)
        for i, (_, f, prompt, (lo, hi)) in enumerate(parts):
            m = which == i
            d[m] = np.clip(f(m.sum()), 0.3, 30.0)
            tok[m] = prompt + rng.integers(lo, hi + 1, m.sum())
        return d, tok
    raise ValueError(name)


def measure_positions(args) -> dict:
    rng = np.random.default_rng(args.seed)
    rows = []
    for dist in args.distributions:
        d, tokens = durations(dist, rng, args.samples)
        d = np.minimum(d, 30.0)  # crop_audio_length
        for fps in (25, 50):
            frames = np.ceil(d * fps).astype(int)
            for sort_key in ("audio", "audio+tokens"):
                gaps = []
                for start in range(0, len(frames) - args.buffer + 1, args.buffer):
                    buf = frames[start : start + args.buffer]
                    key = d[start : start + args.buffer].copy()
                    if sort_key == "audio+tokens":  # the reference sorts by tokens + seconds
                        key = key + tokens[start : start + args.buffer]
                    buf = buf[np.argsort(-key, kind="stable")]
                    for b in range(0, len(buf) - args.batch + 1, args.batch):  # partial batch dropped
                        batch = buf[b : b + args.batch]
                        gaps += list(batch.max() - batch)
                g = np.array(gaps)
                rows.append({"distribution": dist, "fps": fps, "sort": sort_key, "mean_frames": float(frames.mean()),
                             "zero_gap_frac": float(np.mean(g == 0)), "gap_mean": float(g.mean()),
                             "gap_p50": float(np.percentile(g, 50)), "gap_p90": float(np.percentile(g, 90)),
                             "gap_p99": float(np.percentile(g, 99)), "gap_max": int(g.max()),
                             "gap_rel_mean": float(np.mean(g / frames.mean()))})
    print(f"\n### Position gap max_T - T_i (frames) in reference training batches of {args.batch}, buffers of "
          f"{args.buffer} sorted by length, longest first ({args.samples} simulated clips per row)\n")
    print(table(["clips", "frames/s", "sort key", "mean T", "gap = 0", "mean gap", "p50", "p90", "p99", "max"],
                [[r["distribution"], r["fps"], r["sort"], r["mean_frames"], r["zero_gap_frac"], r["gap_mean"],
                  r["gap_p50"], r["gap_p90"], r["gap_p99"], r["gap_max"]] for r in rows]))
    res = {"batch": args.batch, "buffer": args.buffer, "rows": rows}
    write_json(args.out, "positions", res)
    return res


# --------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["resample", "crop", "trainmode", "positions", "all"])
    p.add_argument("--out", type=Path, default=Path("/tmp/fidelity-audio"))
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: a shared machine)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seconds", type=float, default=2.0, help="clip length for resample/trainmode")
    g = p.add_argument_group("resample")
    g.add_argument("--rates", type=int, nargs="+", default=[8000, 22050, 32000, 44100, 48000])
    g.add_argument("--signals", nargs="+", default=["noise", "speech", "chirp", "tones"])
    g.add_argument("--encoders", nargs="+", default=None,
                   help="resample default: logmel wavlm whisper; crop default: logmel benchmel whisper wavlm wav2vec2")
    g.add_argument("--no-band-gains", dest="band_gains", action="store_false")
    g.add_argument("--reference-python", default=os.environ.get("XARES_REF_PYTHON", "/tmp/xares-ref-venv/bin/python"))
    g = p.add_argument_group("crop")
    g.add_argument("--clip-seconds", type=float, default=6.0)
    g.add_argument("--crop-seconds", type=float, default=2.0)
    g.add_argument("--edge-seconds", type=float, default=0.5)
    g.add_argument("--window-seconds", type=float, default=30.0, help="Whisper's max_audio_seconds (windows)")
    g.add_argument("--crops", type=int, default=4, help="random crops per clip")
    g.add_argument("--crop-signals", nargs="+", default=["speech", "scene"])
    g = p.add_argument_group("trainmode")
    g.add_argument("--layers", type=int, nargs="+", default=[2, 12])
    g.add_argument("--repeats", type=int, default=3)
    g.add_argument("--bn-settle", type=int, default=200)
    g.add_argument("--bn-steps", type=int, nargs="+", default=[10, 100, 1000])
    g = p.add_argument_group("positions")
    g.add_argument("--distributions", nargs="+", default=["esc50", "speechcommands", "clotho", "librispeech", "track1-mix"])
    g.add_argument("--samples", type=int, default=128 * 400)
    g.add_argument("--batch", type=int, default=4)
    g.add_argument("--buffer", type=int, default=128)
    args = p.parse_args(argv)
    todo = ["resample", "crop", "trainmode", "positions"] if args.what == "all" else [args.what]
    for what in todo:
        a = argparse.Namespace(**vars(args))
        if a.encoders is None:
            a.encoders = ["logmel", "wavlm", "whisper"] if what == "resample" else \
                ["logmel", "benchmel", "whisper", "wavlm", "wav2vec2"]
        globals()[f"measure_{what}"](a)
    print(f"\nJSON in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
