"""Whisper-style encoder, frames trimmed to the audio (zoo entry a1).

The real ``transformers`` WhisperEncoder (random weights, reduced: d_model 64, 2 layers), fed with the
Whisper log-mel front-end written in plain torch (n_fft 400, hop 160, 80 Slaney mel bands, log10,
dynamic range 8, (x + 4) / 4). As Whisper does, every clip is zero-padded to 30 s (3000 mel frames,
1500 encoder frames); the output is then cut to ceil(samples / 320) frames: 50 frames/s, 20 ms hop,
with a frame mask for the clips shorter than the batch. Padding to 30 s makes each clip's frames the
same alone or in a batch.
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
HOP = 2 * MEL_HOP  # samples per encoder frame (conv2 has stride 2): 20 ms
MAX_FRAMES = N_SAMPLES // HOP  # 1500


def whisper_log_mel(audio: torch.Tensor, window: torch.Tensor, filters: torch.Tensor) -> torch.Tensor:
    """[B, N_SAMPLES] -> [B, n_mels, 3000], as WhisperFeatureExtractor computes it (in torch)."""
    x = F.pad(audio[:, None, :], (N_FFT // 2, N_FFT // 2), mode="reflect")[:, 0]  # center=True
    spec = torch.stft(x, N_FFT, MEL_HOP, window=window, center=False, return_complex=True)
    power = spec[..., :-1].abs() ** 2  # [B, 201, 3000]
    mel = torch.matmul(filters.T, power)  # [B, n_mels, 3000]
    log_spec = torch.clamp(mel, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.amax(dim=(1, 2), keepdim=True) - 8.0)
    return (log_spec + 4.0) / 4.0


class WhisperTrimmedEncoder(torch.nn.Module):
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
        if audio_attention_mask is None:
            audio_attention_mask = torch.ones_like(audio, dtype=torch.long)
        audio = (audio * audio_attention_mask.to(audio.dtype))[:, :N_SAMPLES]
        lengths = audio_attention_mask[:, :N_SAMPLES].sum(-1)
        n = audio.shape[1]
        x = F.pad(audio, (0, N_SAMPLES - n))  # Whisper always sees 30 s
        feats = self.whisper(whisper_log_mel(x, self.window, self.filters)).last_hidden_state  # [B, 1500, D]
        t = (n + HOP - 1) // HOP
        feats = feats[:, :t]
        frames = torch.div(lengths + HOP - 1, HOP, rounding_mode="floor")
        mask = torch.arange(t, device=feats.device)[None, :] < frames[:, None]
        return feats, mask.long()
