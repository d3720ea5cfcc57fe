"""The correct encoder every broken one in this folder starts from (copied beside each encoder.py)."""

import torch

HOP, WIN = 320, 400


class ConvFrontEnd(torch.nn.Module):
    """Strided conv front-end with fixed random weights: 20 ms hop, a frame mask for padding."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.output_dim = 32
        self.conv = torch.nn.Conv1d(1, 32, WIN, stride=HOP)

    def frames(self, audio, audio_attention_mask):
        if audio_attention_mask is None:
            audio_attention_mask = torch.ones_like(audio, dtype=torch.long)
        audio = audio * audio_attention_mask.to(audio.dtype)
        x = torch.nn.functional.pad(audio, (0, WIN))[:, None, :]
        feats = self.conv(x).transpose(1, 2)  # [B, T, D]
        n = torch.div(audio_attention_mask.sum(-1) + HOP - 1, HOP, rounding_mode="floor")
        mask = torch.arange(feats.shape[1])[None, :] < n[:, None]
        return feats, mask.long()

    def forward(self, audio, audio_attention_mask=None):
        return self.frames(audio, audio_attention_mask)
