from conv_base import ConvFrontEnd


class ConvEncoder(ConvFrontEnd):
    """Broken: every call raises."""

    def forward(self, audio, audio_attention_mask=None):
        raise RuntimeError("checkpoint not loaded")
