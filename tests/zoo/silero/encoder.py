"""Silero VAD's trained encoder (zoo entry g): real weights, unnormalised features.

The weights are those of the ``silero-vad`` package (``silero_vad_16k.safetensors``, MIT licence, see
LICENSE.silero-vad), copied next to this file so the submission is self-contained. The architecture is
the one the package describes in ``tinygrad_model.py``, written here in plain torch: the audio is cut
into 32 ms chunks (512 samples) each prefixed with the 64 samples before it, as the streaming model
sees them; every chunk is reflect-padded by 64 samples, transformed by a learned STFT (a 256-tap
convolution with stride 128, magnitudes of 129 bins) and four ReLU convolutions (strides 1, 2, 2, 1)
down to one 128-channel vector. Those vectors are the features: D = 128, 31.25 frames/s (32 ms hop).
The LSTM and the speech-probability head that follow in the VAD are not used.

Chunks are independent, so a clip's frames do not depend on the padding. The trained convolutions have
large weights and no normalisation: feature values reach the thousands and more on loud audio.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

WEIGHTS = Path(__file__).with_name("silero_vad_16k.safetensors")
CHUNK, CONTEXT, PAD = 512, 64, 64  # samples
CUTOFF = 129  # STFT bins (n_fft 256)


class SileroVadEncoder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stft_conv = torch.nn.Conv1d(1, 2 * CUTOFF, kernel_size=256, stride=128, bias=False)
        self.conv1 = torch.nn.Conv1d(CUTOFF, 128, kernel_size=3, stride=1, padding=1)
        self.conv2 = torch.nn.Conv1d(128, 64, kernel_size=3, stride=2, padding=1)
        self.conv3 = torch.nn.Conv1d(64, 64, kernel_size=3, stride=2, padding=1)
        self.conv4 = torch.nn.Conv1d(64, 128, kernel_size=3, stride=1, padding=1)
        state = load_file(str(WEIGHTS))
        own = self.state_dict()
        self.load_state_dict({k: v for k, v in state.items() if k in own}, strict=True)
        self.output_dim = 128

    def forward(self, audio: torch.Tensor, audio_attention_mask: torch.Tensor | None = None):
        if audio_attention_mask is None:
            audio_attention_mask = torch.ones_like(audio, dtype=torch.long)
        audio = audio * audio_attention_mask.to(audio.dtype)
        b, s = audio.shape
        n = (s + CHUNK - 1) // CHUNK
        chunks = F.pad(audio, (0, n * CHUNK - s)).reshape(b, n, CHUNK)
        context = F.pad(chunks[:, :-1, CHUNK - CONTEXT :], (0, 0, 1, 0))  # zeros before the first chunk
        x = torch.cat([context, chunks], dim=-1).reshape(b * n, 1, CONTEXT + CHUNK)
        x = F.pad(x, (0, PAD), mode="reflect")  # [b n, 1, 640]
        x = self.stft_conv(x)  # [b n, 258, 4]
        x = torch.sqrt(x[:, :CUTOFF] ** 2 + x[:, CUTOFF:] ** 2)
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.relu(self.conv3(x))
        x = F.relu(self.conv4(x))  # [b n, 128, 1]
        feats = x.reshape(b, n, self.output_dim)
        frames = torch.div(audio_attention_mask.sum(-1) + CHUNK - 1, CHUNK, rounding_mode="floor")
        mask = torch.arange(n, device=feats.device)[None, :] < frames[:, None]
        return feats, mask.long()
