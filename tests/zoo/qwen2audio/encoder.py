"""Qwen2-Audio's audio encoder (zoo entry d).

The real ``transformers`` Qwen2AudioEncoder (Whisper-large-v3-style: 128 mel bands, two convolutions,
transformer, then an average pooling of 2) with random weights, reduced to d_model 64 and 2 layers.
The log-mel front-end is WhisperFeatureExtractor's, written in plain torch. As Qwen2-Audio does, the
clip is padded to 30 s and the attention ignores the frames after the clip's end (the mask
Qwen2AudioForConditionalGeneration builds). The pooling makes the hop 40 ms (25 frames/s); the
output is cut to ceil(samples / 640) frames, with a frame mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import Qwen2AudioEncoderConfig
from transformers.audio_utils import mel_filter_bank
from transformers.models.qwen2_audio.modeling_qwen2_audio import Qwen2AudioEncoder as HFQwen2AudioEncoder

SAMPLE_RATE = 16000
N_SAMPLES = 30 * SAMPLE_RATE
N_FFT, MEL_HOP, N_MELS = 400, 160, 128
CONV_HOP = 2 * MEL_HOP  # 20 ms: the transformer's frames
HOP = 2 * CONV_HOP  # 40 ms after the average pooling
MAX_POSITIONS = N_SAMPLES // CONV_HOP  # 1500


def whisper_log_mel(audio: torch.Tensor, window: torch.Tensor, filters: torch.Tensor) -> torch.Tensor:
    """[B, N_SAMPLES] -> [B, n_mels, 3000], as WhisperFeatureExtractor computes it (in torch)."""
    x = F.pad(audio[:, None, :], (N_FFT // 2, N_FFT // 2), mode="reflect")[:, 0]  # center=True
    spec = torch.stft(x, N_FFT, MEL_HOP, window=window, center=False, return_complex=True)
    power = spec[..., :-1].abs() ** 2
    mel = torch.matmul(filters.T, power)
    log_spec = torch.clamp(mel, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.amax(dim=(1, 2), keepdim=True) - 8.0)
    return (log_spec + 4.0) / 4.0


class Qwen2AudioTowerEncoder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        config = Qwen2AudioEncoderConfig(
            num_mel_bins=N_MELS, d_model=64, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=128,
            max_source_positions=MAX_POSITIONS, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
        )
        self.tower = HFQwen2AudioEncoder(config).eval()
        self.output_dim = config.d_model
        self.register_buffer("window", torch.hann_window(N_FFT), persistent=False)
        fb = mel_filter_bank(num_frequency_bins=N_FFT // 2 + 1, num_mel_filters=N_MELS, min_frequency=0.0,
                             max_frequency=8000.0, sampling_rate=SAMPLE_RATE, norm="slaney", mel_scale="slaney")
        self.register_buffer("filters", torch.from_numpy(fb).float(), persistent=False)

    def forward(self, audio: torch.Tensor, audio_attention_mask: torch.Tensor | None = None):
        if audio_attention_mask is None:
            audio_attention_mask = torch.ones_like(audio, dtype=torch.long)
        audio = (audio * audio_attention_mask.to(audio.dtype))[:, :N_SAMPLES]
        lengths = audio_attention_mask[:, :N_SAMPLES].sum(-1)
        n = audio.shape[1]
        x = F.pad(audio, (0, N_SAMPLES - n))
        # Qwen2AudioForConditionalGeneration's attention mask: keys after the clip's end are ignored
        conv_frames = torch.clamp(torch.div(lengths + CONV_HOP - 1, CONV_HOP, rounding_mode="floor"), min=1)
        keys = torch.arange(MAX_POSITIONS, device=audio.device)[None, :] >= conv_frames[:, None]  # [B, 1500]
        bias = keys[:, None, None, :].to(audio.dtype) * torch.finfo(audio.dtype).min
        bias = bias.expand(-1, 1, MAX_POSITIONS, MAX_POSITIONS)
        feats = self.tower(whisper_log_mel(x, self.window, self.filters), attention_mask=bias).last_hidden_state
        t = (n + HOP - 1) // HOP  # [B, 750, D] -> the batch's frames
        feats = feats[:, :t]
        frames = torch.div(lengths + HOP - 1, HOP, rounding_mode="floor")
        mask = torch.arange(t, device=feats.device)[None, :] < frames[:, None]
        return feats, mask.long()
