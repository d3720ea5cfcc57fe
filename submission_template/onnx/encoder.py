"""Baseline encoder for the XARES-LLM challenge: log-mel filterbank frames, no learned weights.

50 frames per second (20 ms hop, 25 ms Hann window), 80 mel bands from 0 to 8 kHz, log-compressed.
It shows every part of the contract a real encoder needs:

* ``output_dim`` - the feature size D the projector is built for;
* ``forward(audio [B, S], audio_attention_mask [B, S] or None) -> (features [B, T, D], mask [B, T])``;
* padded samples are zeroed with the mask, and the returned frame mask marks the frames that belong
  to each clip, so a clip's frames are the same alone or in a padded batch.

Replace the body with your own model; keep the class name ending in ``Encoder``, a constructor
without required arguments, and deterministic, eval-mode behaviour. Build it with::

    xares-submit build . -o submission.tar
"""

from __future__ import annotations

import torch
from transformers.audio_utils import mel_filter_bank

SAMPLE_RATE = 16000  # Hz, fixed by the contract
HOP = 320  # samples between frames (20 ms -> 50 frames/s)
WIN = 400  # samples per analysis window (25 ms)
N_FFT = 512
N_MELS = 80


class LogMelEncoder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.output_dim = N_MELS
        self.register_buffer("window", torch.hann_window(WIN), persistent=False)
        fbank = mel_filter_bank(
            num_frequency_bins=N_FFT // 2 + 1,
            num_mel_filters=N_MELS,
            min_frequency=0.0,
            max_frequency=SAMPLE_RATE / 2,
            sampling_rate=SAMPLE_RATE,
            norm="slaney",
            mel_scale="slaney",
        )
        self.register_buffer("fbank", torch.from_numpy(fbank).float(), persistent=False)  # [F, M]

    def forward(self, audio: torch.Tensor, audio_attention_mask: torch.Tensor | None = None):
        if audio_attention_mask is None:
            audio_attention_mask = torch.ones_like(audio, dtype=torch.long)
        audio = audio * audio_attention_mask.to(audio.dtype)  # [B, S], padding -> exact zeros
        # Right-pad by one FFT so the last partial frame of every clip exists: frame k covers samples
        # [k*HOP, k*HOP + N_FFT), and clip of n samples owns frames 0 .. ceil(n / HOP) - 1.
        audio = torch.nn.functional.pad(audio, (0, N_FFT))
        spec = torch.stft(
            audio,
            N_FFT,
            hop_length=HOP,
            win_length=WIN,
            window=self.window,
            center=False,
            return_complex=True,
        )  # [B, F, T]
        power = spec.abs().pow(2).transpose(1, 2)  # [B, T, F]
        feats = torch.log(power @ self.fbank + 1e-6)  # [B, T, M]
        lengths = audio_attention_mask.sum(-1)  # [B] samples per clip
        frames = torch.div(lengths + HOP - 1, HOP, rounding_mode="floor")  # ceil(n / HOP)
        mask = torch.arange(feats.shape[1], device=feats.device)[None, :] < frames[:, None]  # [B, T]
        return feats, mask.long()
