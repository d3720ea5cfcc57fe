"""The XARES-LLM model: cached encoder features -> linear projector -> causal LM decoder with LoRA.

The encoder never runs in this process: features come from the feature store, so the projector is the
first layer here. One training row is laid out as::

    [ projected audio frames (T_i) | prompt tokens | target tokens + EOS | padding ]
      labels: -100 ...               -100 ...        target ids, EOS      -100

and its attention mask is the audio frame mask (all ones: the store keeps only real frames) followed by
the text mask. Rows are packed (no hole between audio and text) and padded at the end for training, at
the start for generation, so positions stay contiguous for RoPE. Only the projector and the LoRA weights
train, and only they are saved (a few MB instead of the 548 MB full model), with this config inside::

    model = build_model(ModelConfig(encoder_dim=768))          # SmolLM2-135M from the local HF cache
    model.save_trainable(Path("run/trainable.safetensors"))
    model = load_model(Path("run/trainable.safetensors"))       # same decoder, same weights
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, TaskType, get_peft_model
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from evaluator.errors import ModelError, first_line
from evaluator.hub import decoder_source

logger = logging.getLogger(__name__)

DEFAULT_DECODER = "HuggingFaceTB/SmolLM2-135M"
IGNORE_INDEX = -100  # label value the causal-LM loss skips (audio, prompt, padding)
CHECKPOINT_FORMAT = "xares-eval/audiollm-trainable/1"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class ModelConfig:
    """Everything that shapes the model; stored inside every checkpoint."""

    encoder_dim: int  # the encoder's output_dim D (width of the stored features)
    decoder: str = DEFAULT_DECODER  # hub name (read from the local HF cache) or a local directory
    # LoRA, as in XARES-LLM
    lora_r: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.1
    lora_target: str = "all-linear"
    lora_bias: str = "none"
    dtype: str = "float32"  # storage dtype of the frozen decoder weights: float32 | bfloat16

    def __post_init__(self):
        if not isinstance(self.encoder_dim, int) or self.encoder_dim < 1:
            raise ModelError(f"encoder_dim must be a positive integer, got {self.encoder_dim!r}")
        if self.dtype not in DTYPES:
            raise ModelError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.lora_r < 1 or not 0.0 <= self.lora_dropout < 1.0:
            raise ModelError(f"bad LoRA settings: r={self.lora_r}, dropout={self.lora_dropout}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class Batch:
    """Model inputs for a batch, before embedding. Lists are per row."""

    features: list[torch.Tensor]  # [T_i, D] float32
    prompt_ids: list[list[int]]
    target_ids: list[list[int]] | None = None  # target + EOS (training); None for generation


@dataclass
class Inputs:
    """Embedded, padded decoder inputs."""

    inputs_embeds: torch.Tensor  # [B, L, H]
    attention_mask: torch.Tensor  # [B, L] long, 1 = real
    position_ids: torch.Tensor  # [B, L] long, contiguous over the real positions of each row
    labels: torch.Tensor | None  # [B, L] long, IGNORE_INDEX except on targets


# Packed lengths are padded up to one of these when shapes must repeat (graph capture on a GPU): at most a
# third of a batch is padding, and a whole track runs through about a dozen shapes.
LENGTH_BUCKETS = (64, 128, 192, 256, 320, 384, 512, 640, 768, 1024, 1280, 1536, 2048)
LONG_BUCKET = 512  # beyond the table, multiples of this


def bucket_length(n: int) -> int:
    for b in LENGTH_BUCKETS:
        if n <= b:
            return b
    return -(-n // LONG_BUCKET) * LONG_BUCKET


def bucket_count(n: int) -> int:
    """Target tokens per batch, padded to a multiple of 16 (with ignored entries)."""
    return max(16, -(-n // 16) * 16)


@dataclass
class Collated:
    """A batch laid out on the host (see `AudioLLM.collate`); `to` moves it in a few copies."""

    features: torch.Tensor  # [B, Tf, D] float32, zeros past each clip's frames
    text_ids: torch.Tensor  # [B, Lt] long: prompt (+ target + EOS), pad token after
    source: torch.Tensor  # [B, L] long: each packed position's row in the rows of [audio | text | zero], flattened
    attention_mask: torch.Tensor  # [B, L] long, 1 = real
    position_ids: torch.Tensor  # [B, L] long, contiguous over the real positions of each row
    labels: torch.Tensor | None = None  # [B, L] long (training), IGNORE_INDEX except on targets
    target_pos: torch.Tensor | None = None  # [N] flat index b * L + p of positions that predict a target
    target_ids: torch.Tensor | None = None  # [N] the token each predicts (IGNORE_INDEX on bucket padding)

    def _map(self, fn) -> Collated:
        return Collated(**{k: (fn(v) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()})

    def pin(self) -> Collated:
        """Page-locked copies, so the copy to the GPU runs asynchronously while it computes."""
        return self._map(lambda t: t.pin_memory())

    def to(self, device: torch.device) -> Collated:
        if self.features.device == device:
            return self
        return self._map(lambda t: t.to(device, non_blocking=True))


class TextCodec:
    """Tokenizing and batch layout, shared by `AudioLLM` and the jobs of a pack (`evaluator.pack`).

    Needs ``self.tokenizer`` and ``self._prompt_cache`` (a dict).
    """

    # --- text ----------------------------------------------------------------------------------
    @property
    def eos_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id

    def prompt_ids(self, prompt: str) -> list[int]:
        """Tokenize a prompt the way XARES-LLM does (``tokenizer(prompt)``, default special tokens)."""
        if prompt not in self._prompt_cache:
            self._prompt_cache[prompt] = list(self.tokenizer(prompt)["input_ids"])
        return self._prompt_cache[prompt]

    def target_ids(self, text: str) -> list[int]:
        """Target tokens followed by EOS, so the decoder learns to stop.

        Tokenized as XARES-LLM does, ``tokenizer(text + eos_token)`` with the default special tokens: the
        same ids for SmolLM2, and the same ids as the reference for a tokenizer that adds a BOS too.
        """
        eos = self.tokenizer.eos_token
        if not eos:
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) + [self.eos_token_id]
        return list(self.tokenizer(text + eos)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True).strip()

    def collate(self, batch: Batch, padding_side: str = "right", *, bucket: bool = False) -> Collated:
        """Lay a batch out on the host: padded arrays plus the index maps that pack each row on the device.

        Every per-row loop happens here, in plain tensors, so the device side (`inputs`, `loss`) is a fixed
        handful of kernels with no host synchronisation. ``bucket`` pads the packed length up to one of
        `LENGTH_BUCKETS` (and the target count likewise), so shapes repeat and captured graphs are reused;
        the extra positions are masked padding and change nothing in the real ones.
        """
        assert padding_side in ("left", "right")
        n = len(batch.features)
        assert n == len(batch.prompt_ids) and (batch.target_ids is None or n == len(batch.target_ids))
        frames = [int(f.shape[0]) for f in batch.features]
        feats = nn.utils.rnn.pad_sequence([f.to(torch.float32) for f in batch.features], batch_first=True)
        texts = [list(p) + list(batch.target_ids[i] if batch.target_ids else []) for i, p in enumerate(batch.prompt_ids)]
        t_max, l_max = feats.shape[1], max(len(t) for t in texts)
        ids = torch.full((n, l_max), self.pad_token_id, dtype=torch.long)
        for i, t in enumerate(texts):
            ids[i, : len(t)] = torch.tensor(t, dtype=torch.long)
        lengths = [frames[i] + len(texts[i]) for i in range(n)]
        total = max(lengths)
        if bucket:
            total = bucket_length(total)
        # source[i, j]: the row of position j in the flattened [B, t_max audio frames | l_max text | 1 zero row]
        width = t_max + l_max + 1
        source = (torch.arange(n)[:, None] * width + width - 1).expand(n, total).clone()
        mask = torch.zeros((n, total), dtype=torch.long)
        labels = torch.full((n, total), IGNORE_INDEX, dtype=torch.long)
        for i in range(n):
            start = total - lengths[i] if padding_side == "left" else 0
            row = torch.cat([torch.arange(frames[i]), t_max + torch.arange(len(texts[i]))])
            source[i, start : start + lengths[i]] = i * width + row
            mask[i, start : start + lengths[i]] = 1
            if batch.target_ids:
                first = start + frames[i] + len(batch.prompt_ids[i])
                labels[i, first : first + len(batch.target_ids[i])] = torch.tensor(batch.target_ids[i])
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        target_pos = target_ids = None
        if batch.target_ids is not None:
            # position p predicts token p + 1: keep the positions whose next label is a target
            keep = labels[:, 1:] != IGNORE_INDEX
            rows, cols = keep.nonzero(as_tuple=True)
            target_pos = rows * total + cols
            target_ids = labels[:, 1:][keep]
            if bucket:
                extra = bucket_count(len(target_pos)) - len(target_pos)
                target_pos = torch.cat([target_pos, target_pos.new_zeros(extra)])
                target_ids = torch.cat([target_ids, target_ids.new_full((extra,), IGNORE_INDEX)])
        return Collated(features=feats, text_ids=ids, source=source, attention_mask=mask, position_ids=position_ids,
                        labels=labels if batch.target_ids is not None else None,
                        target_pos=target_pos, target_ids=target_ids)


class AudioLLM(TextCodec, nn.Module):
    """Projector + LoRA decoder. Build it with `build_model` or `load_model`."""

    def __init__(self, config: ModelConfig, decoder: nn.Module, tokenizer):
        super().__init__()
        self.config = config
        self.decoder = decoder  # peft PeftModelForCausalLM
        self.tokenizer = tokenizer
        hidden = decoder.get_input_embeddings().embedding_dim
        self.projector = nn.Linear(config.encoder_dim, hidden)  # fp32 even when the decoder is bf16
        self._prompt_cache: dict[str, list[int]] = {}

    # --- tensors -------------------------------------------------------------------------------
    def trainable_names(self) -> list[str]:
        return [n for n, p in self.named_parameters() if p.requires_grad]

    def inputs(self, c: Collated) -> Inputs:
        """Project the audio, embed the text and pack both as ``c`` says, on the model's device."""
        return pack_inputs(self.projector, self.decoder.get_input_embeddings(), c)

    def embed(self, batch: Batch, padding_side: str = "right") -> Inputs:
        """Project audio, embed text, pack each row and pad the batch on ``padding_side``."""
        return self.inputs(self.collate(batch, padding_side))

    def body(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """The decoder's transformer layers without the LM head: [B, L, H] -> last hidden states [B, L, H]."""
        return self.decoder.get_base_model().get_decoder()(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
        ).last_hidden_state

    def loss(self, c: Collated, body=None) -> torch.Tensor:
        """Mean cross-entropy over the target tokens (+ EOS) of a collated training batch.

        The LM head (49152 x 576 for SmolLM2, a fifth of the model's compute) only runs on the positions
        that predict a target token, not on every audio frame; the loss is the same mean over targets.
        ``body`` replaces `body` (a graph-captured copy of it, in training on a GPU).
        """
        c = c.to(self.projector.weight.device)
        x = self.inputs(c)
        hidden = (body or self.body)(x.inputs_embeds, x.attention_mask, x.position_ids)  # [B, L, H]
        picked = hidden.flatten(0, 1).index_select(0, c.target_pos)  # [N, H]
        logits = self.decoder.get_base_model().get_output_embeddings()(picked)  # [N, V]
        return nn.functional.cross_entropy(logits.float(), c.target_ids, ignore_index=IGNORE_INDEX)

    def forward(self, batch: Batch) -> torch.Tensor:
        """Mean cross-entropy over the target tokens of ``batch`` (see `loss`)."""
        return self.loss(self.collate(batch, "right"))

    # --- checkpoints ---------------------------------------------------------------------------
    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().contiguous() for n, p in self.named_parameters() if p.requires_grad}

    def save_trainable(self, path: Path) -> None:
        """Write projector + LoRA weights and the model config to one safetensors file (atomically)."""
        write_trainable(path, self.config, self.trainable_state())

    def load_trainable(self, path: Path) -> None:
        """Load projector + LoRA weights written by `save_trainable` into this model.

        Raises:
            ModelError: unreadable file, another model config, or a different set of tensors.
        """
        params = dict(self.named_parameters())
        copy_trainable(path, self.config, {n: params[n] for n in self.trainable_names()})


def pack_inputs(projector: nn.Module, embed_tokens: nn.Module, c: Collated) -> Inputs:
    """Project the audio, embed the text and pack both as ``c`` says (one job's rows, in a pack too)."""
    device = projector.weight.device
    c = c.to(device)
    audio = projector(c.features)  # [B, Tf, H]
    text = embed_tokens(c.text_ids)  # [B, Lt, H]
    audio = audio.to(text.dtype)
    n, _, hidden = text.shape
    both = torch.cat([audio, text, text.new_zeros(n, 1, hidden)], dim=1)  # [B, Tf + Lt + 1, H]
    # index_select, not gather: its backward (index_add) is deterministic on CUDA in any dimension
    embeds = both.flatten(0, 1).index_select(0, c.source.flatten()).view(n, -1, hidden)  # [B, L, H]
    return Inputs(inputs_embeds=embeds, attention_mask=c.attention_mask, position_ids=c.position_ids,
                  labels=c.labels)


def write_trainable(path: Path, config: ModelConfig, tensors: dict[str, torch.Tensor]) -> None:
    """Write trainable tensors (projector + LoRA, by their solo model's names) and the config, atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    meta = {"format": CHECKPOINT_FORMAT, "model_config": json.dumps(config.to_dict(), sort_keys=True)}
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)


def copy_trainable(path: Path, config: ModelConfig, params: dict[str, torch.Tensor]) -> None:
    """Copy a `write_trainable` file into ``params`` (name -> parameter), checking config, names and shapes.

    Raises:
        ModelError: unreadable file, another model config, or a different set of tensors.
    """
    saved, tensors = read_trainable(path)
    if dataclasses.replace(saved, dtype="float32") != dataclasses.replace(config, dtype="float32"):
        raise ModelError(f"checkpoint {path} was made for {saved}, this model is {config}")
    if set(tensors) != set(params):
        missing, extra = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
        raise ModelError(f"checkpoint {path} does not match the model: missing {missing[:3]}, extra {extra[:3]}")
    with torch.no_grad():
        for name, value in tensors.items():
            if params[name].shape != value.shape:
                raise ModelError(f"checkpoint {path}: {name} has shape {tuple(value.shape)}, "
                                 f"model expects {tuple(params[name].shape)}")
            params[name].copy_(value)


def read_trainable(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read a `save_trainable` file: its model config and tensors.

    Raises:
        ModelError: the file is missing, corrupt, or not one of ours.
    """
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for truncated/garbage files
        raise ModelError(f"cannot read model checkpoint {path}: {e}") from e
    if meta.get("format") != CHECKPOINT_FORMAT or "model_config" not in meta:
        raise ModelError(f"{path} is not an xares-eval model checkpoint (format {meta.get('format')!r})")
    return ModelConfig.from_dict(json.loads(meta["model_config"])), tensors


def load_decoder(name_or_path: str, dtype: str = "float32"):
    """Load a causal LM and its tokenizer by hub name (local cache) or directory.

    Returns:
        (decoder, tokenizer); the tokenizer's pad token falls back to EOS, as in XARES-LLM.

    Raises:
        ModelError: a hub name not found, not loadable, or the tokenizer has no EOS token.
        ConfigError: a directory that does not exist or lacks a model's files (`decoder_source`).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, local_only, hint = decoder_source(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
        decoder = AutoModelForCausalLM.from_pretrained(source, dtype=DTYPES[dtype], local_files_only=local_only)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load decoder {name_or_path!r}: {first_line(e).rstrip('. ')}; {hint}") from e
    if tokenizer.eos_token_id is None:
        raise ModelError(f"decoder {name_or_path!r}: its tokenizer has no EOS token; generation could never stop")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return decoder, tokenizer


def lora_config(config: ModelConfig) -> LoraConfig:
    return LoraConfig(
        task_type=TaskType.CAUSAL_LM, inference_mode=False, r=config.lora_r, lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout, target_modules=config.lora_target, bias=config.lora_bias,
    )


def build_model(config: ModelConfig, *, seed: int = 42) -> AudioLLM:
    """Load the decoder once, wrap it with LoRA, add the projector; only projector + LoRA train.

    Args:
        config: model settings.
        seed: seeds the projector and LoRA initialisation (the global RNG is left untouched).

    Raises:
        ModelError: the decoder cannot be loaded.
    """
    decoder, tokenizer = load_decoder(config.decoder, config.dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        decoder = get_peft_model(decoder, lora_config(config))
        model = AudioLLM(config, decoder, tokenizer)
    for name, p in model.named_parameters():  # LoRA weights stay fp32 even over a bf16 base
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    names = model.trainable_names()
    assert names and all(n.startswith("projector.") or ".lora_" in n for n in names), names
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    logger.info("model: %s + LoRA r=%d; %d trainable of %d parameters", config.decoder, config.lora_r, n_train, n_all)
    return model


def load_model(path: Path) -> AudioLLM:
    """Rebuild the model a `save_trainable` file was made with and load its weights.

    Raises:
        ModelError: unreadable checkpoint or decoder not available.
    """
    config, _ = read_trainable(path)
    model = build_model(config)
    model.load_trainable(path)
    return model
