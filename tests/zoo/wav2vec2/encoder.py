"""wav2vec2-base-shaped encoder (zoo entry c).

The real ``transformers`` Wav2Vec2Model with random weights, configured like facebook/wav2vec2-base:
the seven-convolution feature encoder with ``feat_extract_norm="group"`` (GroupNorm over time after
the first convolution: padding a clip changes its frames), post-norm transformer layers. Reduced to
2 layers of width 64 and 128-channel convolutions to keep the tests fast. 20 ms hop.
"""

from __future__ import annotations

import torch
from transformers import Wav2Vec2Config, Wav2Vec2Model


class Wav2Vec2BaseEncoder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        config = Wav2Vec2Config(
            feat_extract_norm="group", conv_bias=False, conv_dim=(128,) * 7,
            conv_kernel=(10, 3, 3, 3, 3, 2, 2), conv_stride=(5, 2, 2, 2, 2, 2, 2),
            num_conv_pos_embeddings=128, num_conv_pos_embedding_groups=16, do_stable_layer_norm=False,
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0,
            layerdrop=0.0, apply_spec_augment=False,
        )
        self.wav2vec2 = Wav2Vec2Model(config).eval()
        self.output_dim = config.hidden_size

    def forward(self, audio: torch.Tensor, audio_attention_mask: torch.Tensor | None = None):
        if audio_attention_mask is None:
            audio_attention_mask = torch.ones_like(audio, dtype=torch.long)
        audio = audio * audio_attention_mask.to(audio.dtype)
        # wav2vec2-base's feature extractor passes no attention mask (return_attention_mask=False for the
        # group-norm models): the transformer sees the padded frames too, as in the reference recipes
        feats = self.wav2vec2(audio).last_hidden_state  # [B, T, D]
        frames = self.wav2vec2._get_feat_extract_output_lengths(audio_attention_mask.sum(-1))
        mask = torch.arange(feats.shape[1], device=feats.device)[None, :] < frames[:, None]
        return feats, mask.long()
