"""Frozen encoders of clearly different quality for the fidelity benchmark (``run.py``).

Each class has the XARES-LLM encoder interface, the same on both sides of the comparison:
``output_dim`` and ``forward(audio [B, S], audio_attention_mask [B, S] or None) -> (features [B, T, D],
frame mask [B, T])``. Every weight comes from a fixed-seed ``torch.Generator`` (never the global RNG), so
the reference (which imports this file by module path) and this project (which exports it to ONNX
with ``xares-submit build``) get identical weights. All of them zero the padding with the sample mask,
pad on the right only and return ``ceil(samples / hop)`` frames per clip, so a clip's frames do not
depend on what it is batched with (the reference runs padded batches, we extract clip by clip).

Plain torch only (no transformers, numpy or torchaudio) so the file imports unchanged in both venvs
and exports to ONNX.

Quality, best first (by design; ``run.py`` measures it):

* ``MelFineEncoder``    64-band log-mel, 50 frames/s: resolves every class of the synthetic tasks;
* ``MelCoarseEncoder``  6-band log-mel, 12.5 frames/s: pitch only from the ratio of wide bands;
* ``RawProjEncoder``    a fixed random linear map of raw 20 ms frames (no magnitude, phase-dependent);
* ``NoisyMelEncoder``   a 8-band log-mel of the clip buried under loud fixed pseudo-noise (~ -25 dB SNR).
"""

from __future__ import annotations

import math

import torch

SAMPLE_RATE = 16000
NOISE_SECONDS = 31  # NoisyMelEncoder's fixed noise covers the longest clip the probe sends (30 s)

__all__ = ["ENCODERS", "MelFineEncoder", "MelCoarseEncoder", "RawProjEncoder", "NoisyMelEncoder"]


def _mel_filters(n_fft: int, n_mels: int) -> torch.Tensor:
    """HTK-scale triangular filters, [F, M] with F = n_fft // 2 + 1, 0 to 8 kHz."""
    freqs = torch.linspace(0, SAMPLE_RATE / 2, n_fft // 2 + 1, dtype=torch.float64)

    def mel(f):
        return 2595.0 * torch.log10(1.0 + f / 700.0)

    edges = torch.linspace(0.0, float(mel(torch.tensor(SAMPLE_RATE / 2.0))), n_mels + 2, dtype=torch.float64)
    m = mel(freqs)[:, None]
    lower, centre, upper = edges[None, :-2], edges[None, 1:-1], edges[None, 2:]
    fb = torch.clamp(torch.minimum((m - lower) / (centre - lower), (upper - m) / (upper - centre)), min=0.0)
    return fb.float()


def _batch(audio: torch.Tensor, audio_attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, S] audio and its sample mask (all ones when none is given)."""
    if audio.ndim == 1:
        audio = audio[None]
    if audio_attention_mask is None:
        audio_attention_mask = torch.ones_like(audio, dtype=torch.long)
    return audio, audio_attention_mask


def _frame_mask(audio_attention_mask: torch.Tensor, hop: int, frames: int) -> torch.Tensor:
    lengths = audio_attention_mask.sum(-1)
    n = torch.div(lengths + hop - 1, hop, rounding_mode="floor")  # ceil(samples / hop)
    return (torch.arange(frames, device=lengths.device)[None, :] < n[:, None]).long()


class _LogMel(torch.nn.Module):
    """Log-mel frames of masked audio: right-padded by one FFT, no centring (padding-invariant)."""

    def __init__(self, n_fft: int, hop: int, win: int, n_mels: int, scale: float = 4.0):
        super().__init__()
        self.n_fft, self.hop, self.win, self.scale = n_fft, hop, win, scale
        self.output_dim = n_mels
        self.register_buffer("window", torch.hann_window(win), persistent=False)
        self.register_buffer("fbank", _mel_filters(n_fft, n_mels), persistent=False)

    def logmel(self, audio: torch.Tensor) -> torch.Tensor:
        audio = torch.nn.functional.pad(audio, (0, self.n_fft))
        spec = torch.stft(audio, self.n_fft, hop_length=self.hop, win_length=self.win, window=self.window,
                          center=False, return_complex=True)
        power = spec.abs().pow(2).transpose(1, 2)  # [B, T, F]
        return (torch.log(power @ self.fbank + 1e-6) + self.scale) / self.scale  # roughly zero-centred

    def forward(self, audio: torch.Tensor, audio_attention_mask: torch.Tensor | None = None):
        audio, audio_attention_mask = _batch(audio, audio_attention_mask)
        audio = audio * audio_attention_mask.to(audio.dtype)
        feats = self.logmel(audio)
        return feats, _frame_mask(audio_attention_mask, self.hop, feats.shape[1])


class MelFineEncoder(_LogMel):
    """Good: 64-band log-mel, 25 ms windows, 50 frames/s."""

    def __init__(self, **kwargs):
        super().__init__(n_fft=512, hop=320, win=400, n_mels=64)


class MelCoarseEncoder(_LogMel):
    """Coarse: 6 wide mel bands, 80 ms hop (12.5 frames/s)."""

    def __init__(self, **kwargs):
        super().__init__(n_fft=512, hop=1280, win=512, n_mels=6)


class NoisyMelEncoder(_LogMel):
    """Mostly noise: 8-band log-mel (25 frames/s) of the clip plus fixed white noise of std 4.

    The noise is one fixed sequence (seed 3), the same for every clip and call, added to the real
    samples only (padding stays zero): deterministic, and the frames do not depend on the batch.
    """

    def __init__(self, **kwargs):
        super().__init__(n_fft=512, hop=640, win=512, n_mels=8)
        g = torch.Generator().manual_seed(3)
        self.register_buffer("noise", 4.0 * torch.randn(NOISE_SECONDS * SAMPLE_RATE, generator=g))

    def forward(self, audio: torch.Tensor, audio_attention_mask: torch.Tensor | None = None):
        audio, audio_attention_mask = _batch(audio, audio_attention_mask)
        keep = audio_attention_mask.to(audio.dtype)
        noisy = (audio + self.noise[: audio.shape[1]][None, :]) * keep
        feats = self.logmel(noisy)
        return feats, _frame_mask(audio_attention_mask, self.hop, feats.shape[1])


class RawProjEncoder(torch.nn.Module):
    """Poor: a fixed random projection (seed 1) of raw non-overlapping 20 ms frames to 64 dims."""

    def __init__(self, **kwargs):
        super().__init__()
        self.hop, self.output_dim = 320, 64
        g = torch.Generator().manual_seed(1)
        weight = torch.randn(self.output_dim, 1, self.hop, generator=g) * (4.0 / math.sqrt(self.hop))
        self.register_buffer("weight", weight)

    def forward(self, audio: torch.Tensor, audio_attention_mask: torch.Tensor | None = None):
        audio, audio_attention_mask = _batch(audio, audio_attention_mask)
        audio = audio * audio_attention_mask.to(audio.dtype)
        audio = torch.nn.functional.pad(audio, (0, self.hop - 1))  # the last partial frame exists
        feats = torch.nn.functional.conv1d(audio[:, None, :], self.weight, stride=self.hop).transpose(1, 2)
        return feats, _frame_mask(audio_attention_mask, self.hop, feats.shape[1])


# benchmark name -> class, best first
ENCODERS = {
    "mel-fine": MelFineEncoder,
    "mel-coarse": MelCoarseEncoder,
    "raw-proj": RawProjEncoder,
    "noisy-mel": NoisyMelEncoder,
}
