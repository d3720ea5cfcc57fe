from conv_base import ConvFrontEnd


class ConvEncoder(ConvFrontEnd):
    """Broken: returns half of its declared output_dim."""

    def forward(self, audio, audio_attention_mask=None):
        feats, mask = self.frames(audio, audio_attention_mask)
        return feats[..., :16], mask  # bug: half of output_dim
