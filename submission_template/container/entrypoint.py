"""Baseline container encoder implementing the xares extract protocol (numpy only, no torch).

Protocol (see README.md): read /input/request.json, encode every item's mono float32 16 kHz WAV,
write one ``<id>.npy`` [T, D] per item and /output/response.json listing each item once with
status "ok" (features, shape, dtype) or "error" (a message). Nothing else may be written to /output.

Features: 80-band log-mel, 25 ms Hann window, 20 ms hop (50 frames/s), frame k covering samples
[k*320, k*320 + 512), T = ceil(samples / 320) - the same frames as the ONNX template's encoder.
Replace `encode` with your model; keep the rest.
"""

from __future__ import annotations

import json
import math
import os
import sys
import traceback
from pathlib import Path

import numpy as np
import soundfile as sf

INPUT = Path(os.environ.get("XARES_INPUT", "/input"))
OUTPUT = Path(os.environ.get("XARES_OUTPUT", "/output"))
SAMPLE_RATE = 16000  # Hz, fixed by the protocol
HOP = 320  # samples between frames (20 ms)
WIN = 400  # samples per analysis window (25 ms)
N_FFT = 512
N_MELS = 80
DTYPE = np.float32  # must equal manifest.json's output_dtype


def _hz_to_mel(hz):
    """Slaney mel scale: linear below 1 kHz, logarithmic above."""
    hz = np.asarray(hz, dtype=np.float64)
    mel = hz * 3.0 / 200.0
    log_part = 15.0 + np.log(np.maximum(hz, 1e-10) / 1000.0) / (math.log(6.4) / 27.0)
    return np.where(hz >= 1000.0, log_part, mel)


def _mel_to_hz(mel):
    mel = np.asarray(mel, dtype=np.float64)
    hz = mel * 200.0 / 3.0
    log_part = 1000.0 * np.exp((math.log(6.4) / 27.0) * (mel - 15.0))
    return np.where(mel >= 15.0, log_part, hz)


def mel_filter_bank() -> np.ndarray:
    """[N_FFT // 2 + 1, N_MELS] triangular filters, Slaney area normalisation, 0 to 8 kHz."""
    fft_hz = np.linspace(0.0, SAMPLE_RATE / 2, N_FFT // 2 + 1)
    edges = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(SAMPLE_RATE / 2), N_MELS + 2))
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]  # [M, 1]
    rising = (fft_hz[None, :] - lower) / (centre - lower)
    falling = (upper - fft_hz[None, :]) / (upper - centre)
    tri = np.maximum(0.0, np.minimum(rising, falling))  # [M, F]
    tri *= (2.0 / (upper - lower))  # equal area per band
    return tri.T.astype(np.float32)


FBANK = mel_filter_bank()
# torch.stft centres a shorter window inside the FFT frame; do the same so frames match the ONNX template.
WINDOW = np.zeros(N_FFT, dtype=np.float32)
_OFF = (N_FFT - WIN) // 2
WINDOW[_OFF:_OFF + WIN] = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(WIN) / WIN)  # periodic Hann


def encode(wave: np.ndarray) -> np.ndarray:
    """[S] float32 at 16 kHz -> [ceil(S / HOP), N_MELS] log-mel features."""
    n_frames = -(-wave.size // HOP)
    padded = np.concatenate([wave, np.zeros(N_FFT, dtype=np.float32)])
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP][:n_frames]  # [T, N_FFT]
    power = np.abs(np.fft.rfft(frames * WINDOW, axis=-1)) ** 2  # [T, F]
    return np.log(power.astype(np.float32) @ FBANK + 1e-6).astype(DTYPE)  # [T, M]


def read_request() -> list[dict]:
    doc = json.loads((INPUT / "request.json").read_text())
    if doc.get("schema_version") != 1 or doc.get("sample_rate") != SAMPLE_RATE:
        raise ValueError(f"unsupported request: schema_version={doc.get('schema_version')} "
                         f"sample_rate={doc.get('sample_rate')}")
    items = doc.get("items")
    if not isinstance(items, list) or not items:
        raise ValueError("request.json has no items")
    return items


def load_item(item: dict) -> np.ndarray:
    path = (INPUT / item["path"]).resolve()
    if INPUT.resolve() not in path.parents:
        raise ValueError(f"item path {item['path']!r} leaves /input")
    wave, rate = sf.read(path, dtype="float32", always_2d=True)
    if rate != SAMPLE_RATE or wave.shape[1] != 1:
        raise ValueError(f"expected mono {SAMPLE_RATE} Hz audio, got {wave.shape[1]} channel(s) at {rate} Hz")
    if wave.shape[0] != item["num_samples"]:
        raise ValueError(f"{wave.shape[0]} samples, the request says {item['num_samples']}")
    return wave[:, 0]


def main() -> int:
    try:
        items = read_request()
    except Exception as e:  # noqa: BLE001 - no request, no answers: fail the whole run
        print(f"cannot read /input/request.json: {e}", file=sys.stderr)
        return 1
    answers = []
    for item in items:
        item_id = str(item.get("id"))
        try:
            feats = encode(load_item(item))
            name = f"{item_id}.npy"
            np.save(OUTPUT / name, feats, allow_pickle=False)
            answers.append({"id": item_id, "status": "ok", "features": name,
                            "shape": list(feats.shape), "dtype": str(feats.dtype)})
        except Exception as e:  # noqa: BLE001 - one bad item is reported, the rest encoded
            traceback.print_exc(file=sys.stderr)
            answers.append({"id": item_id, "status": "error", "error": f"{type(e).__name__}: {e}"[:4000]})
    tmp = OUTPUT / ".response.json.tmp"
    tmp.write_text(json.dumps({"schema_version": 1, "items": answers}))
    tmp.rename(OUTPUT / "response.json")  # the evaluator never sees a half-written response
    print(f"encoded {sum(a['status'] == 'ok' for a in answers)}/{len(answers)} item(s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
