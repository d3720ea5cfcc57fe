"""Audio decoding: any soundfile format (wav, flac, mp3, ogg/vorbis, ogg/opus) to mono float32 at 16 kHz.

Decoding happens in memory (no temporary files) and resampling uses soxr. As in XARES-LLM, a clip
whose peak exceeds 1 after the mono mix (float files can) is divided by its peak before resampling.

Example::

    wave = load_audio(Path("clip.flac"))  # np.float32 [S] at 16 kHz
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from evaluator.errors import DataError

SAMPLE_RATE = 16_000  # Hz, what every encoder receives
MAX_SECONDS = 4 * 3600  # longer than this is a broken header or a hostile file, not a clip
AUDIO_EXTENSIONS = ("flac", "mp3", "sox", "wav", "m4a", "mp4a", "ogg", "wma", "opus")  # XARES-LLM's list


def load_audio(data: bytes | Path, *, sample_rate: int = SAMPLE_RATE, name: str = "") -> np.ndarray:
    """Decode audio bytes or a file, mix to mono and resample.

    Args:
        data: encoded audio (bytes) or a path to an audio file.
        sample_rate: output rate in Hz.
        name: what to call the audio in error messages (default: the path).

    Returns:
        float32 array [S] at ``sample_rate``, peak-normalised when it exceeded 1; empty (S = 0) when the
        file holds no frames.

    Raises:
        DataError: the data is not decodable audio, has non-finite samples or an absurd length.
    """
    label = name or (str(data) if isinstance(data, Path) else "audio")
    source = data if isinstance(data, Path) else io.BytesIO(bytes(data))
    try:
        with sf.SoundFile(source) as f:
            sr, frames = f.samplerate, f.frames
            if sr <= 0:
                raise DataError(f"{label}: bad sample rate {sr}")
            if frames > MAX_SECONDS * sr:
                raise DataError(f"{label}: {frames / sr:.0f} s of audio (more than {MAX_SECONDS} s)")
            wave = f.read(dtype="float32", always_2d=True)  # [S, C]
    except DataError:
        raise
    except (sf.LibsndfileError, RuntimeError, ValueError, TypeError, OSError, EOFError) as e:
        raise DataError(f"{label}: not decodable audio ({' '.join(str(e).split())[:200]})") from e
    mono = wave.mean(axis=1, dtype=np.float32) if wave.shape[1] > 1 else wave[:, 0]
    if mono.size == 0:
        return np.zeros(0, dtype=np.float32)
    if not np.isfinite(mono).all():
        raise DataError(f"{label}: audio has NaN or infinite samples")
    peak = float(np.abs(mono).max())
    if peak > 1.0:
        mono = mono / np.float32(peak)
    if sr != sample_rate:
        mono = soxr.resample(mono, sr, sample_rate, quality="HQ")
    return np.ascontiguousarray(mono, dtype=np.float32)
