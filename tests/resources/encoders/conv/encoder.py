from conv_base import ConvFrontEnd


class ConvEncoder(ConvFrontEnd):
    """The correct encoder: builds and validates."""
