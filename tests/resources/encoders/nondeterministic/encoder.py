import torch
from conv_base import ConvFrontEnd


class ConvEncoder(ConvFrontEnd):
    """Broken: adds noise, so two runs differ."""

    def forward(self, audio, audio_attention_mask=None):
        feats, mask = self.frames(audio, audio_attention_mask)
        return feats + 0.1 * torch.randn_like(feats), mask  # bug: random
