"""WavLM-Base-Plus-shaped encoder (zoo entry b).

The real ``transformers`` WavLMModel with random weights. Its front-end is WavLM-Base-Plus's: seven
convolutions (kernels 10,3,3,3,3,2,2, strides 5,2,2,2,2,2,2: 25 ms receptive field, 20 ms hop) with
``feat_extract_norm="group"``, a GroupNorm over time after the first convolution (so the zeros that
pad a clip in a batch change all of its frames). The transformer is reduced (2 layers, width 96) and
the convolutions are 256 channels wide instead of 512 to keep the tests fast.

The sample mask is used as WavLM uses it: padded samples are zeroed, the transformer's attention
ignores padded frames, and the returned frame mask marks each clip's frames.
"""

from __future__ import annotations

import torch
from transformers import WavLMConfig, WavLMModel


class WavLMBasePlusEncoder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        config = WavLMConfig(
            # WavLM-Base-Plus's feature extractor (channel width reduced)
            feat_extract_norm="group", conv_bias=False, conv_dim=(256,) * 7,
            conv_kernel=(10, 3, 3, 3, 3, 2, 2), conv_stride=(5, 2, 2, 2, 2, 2, 2),
            num_conv_pos_embeddings=128, num_conv_pos_embedding_groups=16, do_stable_layer_norm=False,
            num_buckets=320, max_bucket_distance=800,
            # a small transformer
            hidden_size=96, num_hidden_layers=2, num_attention_heads=4, intermediate_size=192,
            hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0,
            layerdrop=0.0, apply_spec_augment=False,
        )
        self.wavlm = WavLMModel(config).eval()
        self.output_dim = config.hidden_size

    def forward(self, audio: torch.Tensor, audio_attention_mask: torch.Tensor | None = None):
        if audio_attention_mask is None:
            audio_attention_mask = torch.ones_like(audio, dtype=torch.long)
        audio = audio * audio_attention_mask.to(audio.dtype)
        feats = self.wavlm(audio, attention_mask=audio_attention_mask).last_hidden_state  # [B, T, D]
        frames = self.wavlm._get_feat_extract_output_lengths(audio_attention_mask.sum(-1))
        mask = torch.arange(feats.shape[1], device=feats.device)[None, :] < frames[:, None]
        return feats, mask.long()
