from conv_base import ConvFrontEnd


class ConvEncoder(ConvFrontEnd):
    """Broken: returns [B, T] instead of [B, T, D]."""

    def forward(self, audio, audio_attention_mask=None):
        feats, mask = self.frames(audio, audio_attention_mask)
        return feats.mean(-1), mask  # bug: [B, T], not [B, T, D]
