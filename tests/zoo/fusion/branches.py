"""The slow branch of the fusion encoder: log-mel frames (10 ms) and two stride-2 convolutions (40 ms).

Imported by encoder.py as a sibling module. Every layer zeroes the frames after the clip's end before
its convolution, so a clip's frames are the same alone or padded in a batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.audio_utils import mel_filter_bank

SAMPLE_RATE = 16000
N_FFT, MEL_HOP, N_MELS = 400, 160, 64
HOP = 4 * MEL_HOP  # 40 ms


def _frames(lengths: torch.Tensor, hop: int) -> torch.Tensor:
    return torch.div(lengths + hop - 1, hop, rounding_mode="floor")


def _keep(x: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
    """Zero the frames (last axis of [B, C, T]) after each clip's end."""
    return x * (torch.arange(x.shape[-1], device=x.device)[None, :] < frames[:, None]).to(x.dtype)[:, None, :]


class MelConvBranch(torch.nn.Module):
    """[B, S] audio -> [B, ceil(S / 640), dim] at 25 frames/s."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.dim = dim
        self.register_buffer("window", torch.hann_window(N_FFT), persistent=False)
        fb = mel_filter_bank(num_frequency_bins=N_FFT // 2 + 1, num_mel_filters=N_MELS, min_frequency=20.0,
                             max_frequency=8000.0, sampling_rate=SAMPLE_RATE, norm="slaney", mel_scale="slaney")
        self.register_buffer("filters", torch.from_numpy(fb).float(), persistent=False)
        self.conv1 = torch.nn.Conv1d(N_MELS, 64, kernel_size=3, stride=2, padding=1)
        self.conv2 = torch.nn.Conv1d(64, dim, kernel_size=3, stride=2, padding=1)
        self.norm = torch.nn.LayerNorm(dim)

    def forward(self, audio: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        x = F.pad(audio, (0, N_FFT))  # frame k covers samples [160 k, 160 k + 400)
        spec = torch.stft(x, N_FFT, MEL_HOP, window=self.window, center=False, return_complex=True)
        mel = torch.log(torch.matmul(self.filters.T, spec.abs() ** 2) + 1e-6)  # [B, M, T10]
        x = _keep(mel, _frames(lengths, MEL_HOP))
        x = _keep(F.gelu(self.conv1(x)), _frames(lengths, 2 * MEL_HOP))
        x = F.gelu(self.conv2(x))  # [B, dim, T40]
        return self.norm(x.transpose(1, 2))
