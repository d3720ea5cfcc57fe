"""A fusion of two encoders at different frame rates (zoo entry e).

* fast branch (20 ms): the real ``transformers`` Wav2Vec2Model with a LayerNorm feature encoder
  (``feat_extract_norm="layer"``, as wav2vec2-large-lv60 and HuBERT-large), random weights, reduced;
* slow branch (40 ms): log-mel + two stride-2 convolutions, in the sibling module ``branches.py``.

The slow branch is upsampled to the fast rate (each frame repeated twice), cut to the fast branch's
frame count and concatenated along D: 64 + 32 = 96 features at 50 frames/s.
"""

from __future__ import annotations

import torch
from branches import MelConvBranch
from transformers import Wav2Vec2Config, Wav2Vec2Model


class FusionEncoder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        config = Wav2Vec2Config(
            feat_extract_norm="layer", conv_bias=True, conv_dim=(64,) * 7,
            conv_kernel=(10, 3, 3, 3, 3, 2, 2), conv_stride=(5, 2, 2, 2, 2, 2, 2),
            num_conv_pos_embeddings=64, num_conv_pos_embedding_groups=16, do_stable_layer_norm=True,
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0,
            layerdrop=0.0, apply_spec_augment=False,
        )
        self.fast = Wav2Vec2Model(config).eval()
        self.slow = MelConvBranch(dim=32)
        self.output_dim = config.hidden_size + self.slow.dim

    def forward(self, audio: torch.Tensor, audio_attention_mask: torch.Tensor | None = None):
        if audio_attention_mask is None:
            audio_attention_mask = torch.ones_like(audio, dtype=torch.long)
        audio = audio * audio_attention_mask.to(audio.dtype)
        lengths = audio_attention_mask.sum(-1)
        fast = self.fast(audio, attention_mask=audio_attention_mask).last_hidden_state  # [B, T, 64], 20 ms
        slow = self.slow(audio, lengths)  # [B, T40, 32], 40 ms
        slow = slow.repeat_interleave(2, dim=1)[:, : fast.shape[1]]  # 2 * T40 >= T
        feats = torch.cat([fast, slow], dim=-1)
        frames = self.fast._get_feat_extract_output_lengths(lengths)
        mask = torch.arange(feats.shape[1], device=feats.device)[None, :] < frames[:, None]
        return feats, mask.long()
