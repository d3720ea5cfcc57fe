from conv_base import ConvFrontEnd


class ConvEncoder(ConvFrontEnd):
    """Correct frames, but manifest.json declares the wrong hop."""
