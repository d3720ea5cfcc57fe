"""Whisper-style encoder that always returns its 1500 frames (zoo entry a2).

The real ``transformers`` WhisperEncoder (random weights, reduced: d_model 64, 2 layers) on the
Whisper log-mel front-end written in plain torch. Every clip (up to 30 s) is zero-padded to 30 s and
all 1500 frames are returned, with no frame mask: what the XARES-LLM reference accepts, and what
``"frames": "fixed"`` in manifest.json (schema version 2) declares.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import WhisperConfig
from transformers.audio_utils import mel_filter_bank
from transformers.models.whisper.modeling_whisper import WhisperEncoder as HFWhisperEncoder

SAMPLE_RATE = 16000
N_SAMPLES = 30 * SAMPLE_RATE  # Whisper's 30 s window
N_FFT, MEL_HOP, N_MELS = 400, 160, 80
MAX_FRAMES = N_SAMPLES // (2 * MEL_HOP)  # 1500


def whisper_log_mel(audio: torch.Tensor, window: torch.Tensor, filters: torch.Tensor) -> torch.Tensor:
    """[B, N_SAMPLES] -> [B, n_mels, 3000], as WhisperFeatureExtractor computes it (in torch)."""
    x = F.pad(audio[:, None, :], (N_FFT // 2, N_FFT // 2), mode="reflect")[:, 0]  # center=True
    spec = torch.stft(x, N_FFT, MEL_HOP, window=window, center=False, return_complex=True)
    power = spec[..., :-1].abs() ** 2  # [B, 201, 3000]
    mel = torch.matmul(filters.T, power)  # [B, n_mels, 3000]
    log_spec = torch.clamp(mel, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.amax(dim=(1, 2), keepdim=True) - 8.0)
    return (log_spec + 4.0) / 4.0


class WhisperFixedEncoder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        config = WhisperConfig(
            num_mel_bins=N_MELS, d_model=64, encoder_layers=2, encoder_attention_heads=2,
            encoder_ffn_dim=128, decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=128,
            max_source_positions=MAX_FRAMES, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
        )
        self.whisper = HFWhisperEncoder(config).eval()
        self.output_dim = config.d_model
        self.register_buffer("window", torch.hann_window(N_FFT), persistent=False)
        fb = mel_filter_bank(num_frequency_bins=N_FFT // 2 + 1, num_mel_filters=N_MELS, min_frequency=0.0,
                             max_frequency=8000.0, sampling_rate=SAMPLE_RATE, norm="slaney", mel_scale="slaney")
        self.register_buffer("filters", torch.from_numpy(fb).float(), persistent=False)  # [201, n_mels]

    def forward(self, audio: torch.Tensor, audio_attention_mask: torch.Tensor | None = None):
        if audio_attention_mask is not None:
            audio = audio * audio_attention_mask.to(audio.dtype)
        audio = audio[:, :N_SAMPLES]
        x = F.pad(audio, (0, N_SAMPLES - audio.shape[1]))  # Whisper always sees 30 s
        feats = self.whisper(whisper_log_mel(x, self.window, self.filters)).last_hidden_state  # [B, 1500, D]
        return feats, None
