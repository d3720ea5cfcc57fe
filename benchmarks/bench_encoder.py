"""Benchmark encoder: log-mel (128 bins, 25 frames/s) then a fixed linear map to 768 dims."""
import torch

SAMPLE_RATE = 16000


class BenchLogMelEncoder(torch.nn.Module):
    def __init__(self, **kwargs):
        super().__init__()
        n_fft, n_mels = 1024, 128
        self.hop, self.n_fft, self.output_dim = 640, n_fft, 768
        freqs = torch.linspace(0, SAMPLE_RATE / 2, n_fft // 2 + 1)
        mel = lambda f: 2595 * torch.log10(1 + f / 700)  # noqa: E731
        edges = torch.linspace(0, float(mel(torch.tensor(SAMPLE_RATE / 2))), n_mels + 2)
        m = mel(freqs)
        lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
        fb = torch.clamp(torch.minimum((m - lower) / (centre - lower), (upper - m) / (upper - centre)), min=0)
        self.register_buffer("fb", fb)
        self.register_buffer("window", torch.hann_window(n_fft))
        self.proj = torch.nn.Linear(n_mels, self.output_dim)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            self.proj.weight.copy_(torch.randn(self.output_dim, n_mels, generator=g) / n_mels**0.5)
            self.proj.bias.zero_()
        self.requires_grad_(False)

    def forward(self, audio, audio_attention_mask=None):
        if audio.ndim == 1:
            audio = audio[None]
        spec = torch.stft(audio, self.n_fft, self.hop, window=self.window, return_complex=True).abs() ** 2
        feats = self.proj(torch.log(self.fb @ spec + 1e-6).transpose(1, 2))
        if audio_attention_mask is None:
            return feats, None
        frames = audio_attention_mask.sum(-1) // self.hop + 1
        mask = (torch.arange(feats.shape[1], device=feats.device)[None] < frames[:, None]).long()
        return feats, mask
