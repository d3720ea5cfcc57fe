import torch
from conv_base import ConvFrontEnd


class ConvEncoder(ConvFrontEnd):
    """Broken: sqrt of negative conv outputs gives NaN."""

    def forward(self, audio, audio_attention_mask=None):
        feats, mask = self.frames(audio, audio_attention_mask)
        return torch.sqrt(feats), mask  # bug: conv output can be negative
