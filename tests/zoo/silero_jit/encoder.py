"""Silero VAD through ``torch.jit.load`` (zoo entry g2): a TorchScript module inside encoder.py.

Loads the package's own ``silero_vad.jit`` (from the installed ``silero-vad`` wheel) and returns the
speech probability of every 32 ms chunk as a 1-dimensional feature. A scripted module cannot be
traced by torch.onnx's exporters, so ``xares-submit build`` must refuse this folder, naming
TorchScript as the cause and the ways out (the encoder in plain torch, as ``../silero``; a
``model.onnx`` of your own; a container).
"""

from __future__ import annotations

from importlib.resources import files

import torch
import torch.nn.functional as F

CHUNK = 512  # samples per call of the streaming model at 16 kHz


class SileroJitEncoder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.vad = torch.jit.load(str(files("silero_vad.data") / "silero_vad.jit"), map_location="cpu").eval()
        self.output_dim = 1

    def forward(self, audio: torch.Tensor, audio_attention_mask: torch.Tensor | None = None):
        if audio_attention_mask is None:
            audio_attention_mask = torch.ones_like(audio, dtype=torch.long)
        audio = audio * audio_attention_mask.to(audio.dtype)
        b, s = audio.shape
        n = (s + CHUNK - 1) // CHUNK
        chunks = F.pad(audio, (0, n * CHUNK - s)).reshape(b, n, CHUNK)
        self.vad.reset_states()
        probs = torch.stack([self.vad(chunks[:, i], 16000) for i in range(n)], dim=1)  # [B, n, 1]
        frames = torch.div(audio_attention_mask.sum(-1) + CHUNK - 1, CHUNK, rounding_mode="floor")
        mask = torch.arange(n, device=probs.device)[None, :] < frames[:, None]
        return probs, mask.long()
