import torch


class DummyEncoder(torch.nn.Module):
    """The shape of the reference framework's example: 10 random frames, the sample mask passed back."""

    def __init__(self, **kwargs) -> None:
        super().__init__()
        self.output_dim = 256

    def forward(self, audio, audio_attention_mask=None):
        output = torch.randn(len(audio), 10, self.output_dim, device=audio.device)
        return output, audio_attention_mask
