"""A clip-level embedding in the style of ECAPA-TDNN (zoo entry f): one vector per clip, T = 1.

Log-mel frames (10 ms) with utterance mean normalisation, a TDNN stem, two dilated SE-Res blocks,
multi-layer feature aggregation and attentive statistics pooling (attention with global context,
weighted mean and standard deviation), then a 192-dimensional embedding. Plain torch, random weights,
reduced width (C = 128). Every time-wise step (normalisation, convolutions, squeeze-excitation,
pooling) uses only the clip's own frames, so padding cannot change the embedding.

The frame count does not follow the audio: manifest.json declares ``"frames": "fixed"``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.audio_utils import mel_filter_bank

SAMPLE_RATE = 16000
N_FFT, HOP, WIN, N_MELS = 512, 160, 400, 80
CHANNELS, EMBEDDING = 128, 192


def _masked_mean(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Mean over time of [B, C, T] with weights [B, 1 or C, T] that sum to 1 over T."""
    return (x * w).sum(-1, keepdim=True)


class _TDNN(torch.nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int, dilation: int = 1) -> None:
        super().__init__()
        self.conv = torch.nn.Conv1d(cin, cout, kernel, dilation=dilation, padding=dilation * (kernel - 1) // 2)
        self.norm = torch.nn.BatchNorm1d(cout)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        return self.norm(F.relu(self.conv(x * keep))) * keep


class _SERes(torch.nn.Module):
    """1x1 -> dilated 3-tap TDNN -> 1x1 -> squeeze-excitation (mean over the clip's frames), residual."""

    def __init__(self, channels: int, dilation: int) -> None:
        super().__init__()
        self.tdnn1 = _TDNN(channels, channels, 1)
        self.tdnn2 = _TDNN(channels, channels, 3, dilation)
        self.tdnn3 = _TDNN(channels, channels, 1)
        self.se1 = torch.nn.Conv1d(channels, channels // 4, 1)
        self.se2 = torch.nn.Conv1d(channels // 4, channels, 1)

    def forward(self, x: torch.Tensor, keep: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        h = self.tdnn3(self.tdnn2(self.tdnn1(x, keep), keep), keep)
        s = torch.sigmoid(self.se2(F.relu(self.se1(_masked_mean(h, weights)))))
        return (h * s + x) * keep


class EcapaClipEncoder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.output_dim = EMBEDDING
        self.register_buffer("window", torch.hamming_window(WIN), persistent=False)
        fb = mel_filter_bank(num_frequency_bins=N_FFT // 2 + 1, num_mel_filters=N_MELS, min_frequency=20.0,
                             max_frequency=7600.0, sampling_rate=SAMPLE_RATE, norm=None, mel_scale="htk")
        self.register_buffer("filters", torch.from_numpy(fb).float(), persistent=False)
        self.stem = _TDNN(N_MELS, CHANNELS, 5)
        self.blocks = torch.nn.ModuleList([_SERes(CHANNELS, 2), _SERes(CHANNELS, 3)])
        self.mfa = _TDNN(2 * CHANNELS, 3 * CHANNELS, 1)
        c = 3 * CHANNELS
        self.attention = torch.nn.Sequential(
            torch.nn.Conv1d(3 * c, 64, 1), torch.nn.ReLU(), torch.nn.BatchNorm1d(64), torch.nn.Tanh(),
            torch.nn.Conv1d(64, c, 1),
        )
        self.pool_norm = torch.nn.BatchNorm1d(2 * c)
        self.embed = torch.nn.Linear(2 * c, EMBEDDING)
        with torch.no_grad():  # random but not trivial running statistics, as a trained model has
            for m in self.modules():
                if isinstance(m, torch.nn.BatchNorm1d):
                    m.running_mean.uniform_(-0.1, 0.1)
                    m.running_var.uniform_(0.5, 1.5)

    def forward(self, audio: torch.Tensor, audio_attention_mask: torch.Tensor | None = None):
        if audio_attention_mask is None:
            audio_attention_mask = torch.ones_like(audio, dtype=torch.long)
        audio = audio * audio_attention_mask.to(audio.dtype)
        x = F.pad(audio, (0, N_FFT))  # frame k covers samples [160 k, 160 k + 512)
        spec = torch.stft(x, N_FFT, HOP, win_length=WIN, window=self.window, center=False, return_complex=True)
        mel = torch.log(torch.matmul(self.filters.T, spec.abs() ** 2) + 1e-6)  # [B, M, T]
        frames = torch.clamp(torch.div(audio_attention_mask.sum(-1) + HOP - 1, HOP, rounding_mode="floor"), min=1)
        keep = (torch.arange(mel.shape[-1], device=mel.device)[None, :] < frames[:, None]).to(mel.dtype)[:, None, :]
        weights = keep / frames.to(mel.dtype)[:, None, None]  # uniform over the clip's frames
        mel = (mel - _masked_mean(mel, weights)) * keep  # utterance mean normalisation
        h = self.stem(mel, keep)
        outs = []
        for block in self.blocks:
            h = block(h, keep, weights)
            outs.append(h)
        h = self.mfa(torch.cat(outs, dim=1), keep)  # [B, 3C, T]
        # attentive statistics pooling with global context (ECAPA-TDNN)
        mean = _masked_mean(h, weights)
        std = torch.sqrt(torch.clamp(_masked_mean((h - mean) ** 2, weights), min=1e-6))
        context = torch.cat([h, mean.expand_as(h), std.expand_as(h)], dim=1)
        logits = self.attention(context).masked_fill(keep == 0, -1e4)
        alpha = torch.softmax(logits, dim=-1)
        mu = _masked_mean(h, alpha)
        sigma = torch.sqrt(torch.clamp(_masked_mean((h - mu) ** 2, alpha), min=1e-6))
        pooled = self.pool_norm(torch.cat([mu, sigma], dim=1))  # [B, 2 * 3C, 1]
        return self.embed(pooled.transpose(1, 2)), None  # [B, 1, EMBEDDING]
