from conv_base import ConvFrontEnd


class ConvEncoder(ConvFrontEnd):
    """Broken: normalises over padding frames, so padding changes a clip's own frames."""

    def forward(self, audio, audio_attention_mask=None):
        feats, mask = self.frames(audio, audio_attention_mask)
        return feats - feats.mean(dim=1, keepdim=True), mask  # bug: the mean includes padding frames
