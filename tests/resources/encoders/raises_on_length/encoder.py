from conv_base import ConvFrontEnd


class ConvEncoder(ConvFrontEnd):
    """Broken: only takes multiples of 0.1 s."""

    def forward(self, audio, audio_attention_mask=None):
        feats, mask = self.frames(audio, audio_attention_mask)
        chunks = audio.reshape(audio.shape[0], -1, 1600)  # bug: needs a multiple of 0.1 s
        return feats + chunks.sum() * 0, mask
