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
from evaluator.hub import hub_unreachable

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


class AudioLLM(nn.Module):
    """Projector + LoRA decoder. Build it with `build_model` or `load_model`."""

    def __init__(self, config: ModelConfig, decoder: nn.Module, tokenizer):
        super().__init__()
        self.config = config
        self.decoder = decoder  # peft PeftModelForCausalLM
        self.tokenizer = tokenizer
        hidden = decoder.get_input_embeddings().embedding_dim
        self.projector = nn.Linear(config.encoder_dim, hidden)  # fp32 even when the decoder is bf16
        self._prompt_cache: dict[str, list[int]] = {}

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
        """Target tokens followed by EOS, so the decoder learns to stop."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) + [self.eos_token_id]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True).strip()

    # --- tensors -------------------------------------------------------------------------------
    def trainable_names(self) -> list[str]:
        return [n for n, p in self.named_parameters() if p.requires_grad]

    def embed(self, batch: Batch, padding_side: str = "right") -> Inputs:
        """Project audio, embed text, pack each row and pad the batch on ``padding_side``."""
        assert padding_side in ("left", "right")
        device = self.projector.weight.device
        n = len(batch.features)
        assert n == len(batch.prompt_ids) and (batch.target_ids is None or n == len(batch.target_ids))
        frames = [f.shape[0] for f in batch.features]
        feats = nn.utils.rnn.pad_sequence([f.to(device, torch.float32) for f in batch.features], batch_first=True)
        audio = self.projector(feats)  # [B, Tmax, H]
        texts = [list(p) + list(batch.target_ids[i] if batch.target_ids else []) for i, p in enumerate(batch.prompt_ids)]
        width = max(len(t) for t in texts)
        ids = torch.full((n, width), self.pad_token_id, dtype=torch.long, device=device)
        for i, t in enumerate(texts):
            ids[i, : len(t)] = torch.tensor(t, dtype=torch.long)
        text = self.decoder.get_input_embeddings()(ids)  # [B, Ltext, H]
        audio = audio.to(text.dtype)

        lengths = [frames[i] + len(texts[i]) for i in range(n)]
        total = max(lengths)
        rows, masks, labels = [], [], []
        for i in range(n):
            pad = total - lengths[i]
            row = torch.cat([audio[i, : frames[i]], text[i, : len(texts[i])]])  # [T_i + L_i, H]
            filler = row.new_zeros(pad, row.shape[1])
            # the audio frame mask goes in front of the text mask
            mask = torch.cat([torch.ones(frames[i], dtype=torch.long), torch.ones(len(texts[i]), dtype=torch.long)])
            lab = [IGNORE_INDEX] * (frames[i] + len(batch.prompt_ids[i])) + (
                list(batch.target_ids[i]) if batch.target_ids else []
            )
            lab = torch.tensor(lab, dtype=torch.long)
            zeros, ignore = torch.zeros(pad, dtype=torch.long), torch.full((pad,), IGNORE_INDEX)
            if padding_side == "right":
                rows.append(torch.cat([row, filler]))
                masks.append(torch.cat([mask, zeros]))
                labels.append(torch.cat([lab, ignore]))
            else:
                rows.append(torch.cat([filler, row]))
                masks.append(torch.cat([zeros, mask]))
                labels.append(torch.cat([ignore, lab]))
        attention_mask = torch.stack(masks).to(device)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        return Inputs(
            inputs_embeds=torch.stack(rows),
            attention_mask=attention_mask,
            position_ids=position_ids,
            labels=torch.stack(labels).to(device) if batch.target_ids is not None else None,
        )

    def forward(self, batch: Batch) -> torch.Tensor:
        """Mean cross-entropy over the target tokens (+ EOS) of the batch.

        The LM head (49152 x 576 for SmolLM2, a fifth of the model's compute) only runs on the positions
        that predict a target token, not on every audio frame; the loss is the same mean over targets.
        """
        x = self.embed(batch, padding_side="right")
        causal_lm = self.decoder.get_base_model()
        hidden = causal_lm.get_decoder()(
            inputs_embeds=x.inputs_embeds, attention_mask=x.attention_mask,
            position_ids=x.position_ids, use_cache=False,
        ).last_hidden_state  # [B, L, H]
        targets = x.labels[:, 1:]  # position p predicts token p + 1
        keep = targets != IGNORE_INDEX  # [B, L-1]
        logits = causal_lm.get_output_embeddings()(hidden[:, :-1][keep])  # [N, V]
        return nn.functional.cross_entropy(logits.float(), targets[keep])

    # --- checkpoints ---------------------------------------------------------------------------
    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().contiguous() for n, p in self.named_parameters() if p.requires_grad}

    def save_trainable(self, path: Path) -> None:
        """Write projector + LoRA weights and the model config to one safetensors file (atomically)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        meta = {"format": CHECKPOINT_FORMAT, "model_config": json.dumps(self.config.to_dict(), sort_keys=True)}
        save_file(self.trainable_state(), str(tmp), metadata=meta)
        os.replace(tmp, path)

    def load_trainable(self, path: Path) -> None:
        """Load projector + LoRA weights written by `save_trainable` into this model.

        Raises:
            ModelError: unreadable file, another model config, or a different set of tensors.
        """
        config, tensors = read_trainable(path)
        mine = dataclasses.replace(self.config, dtype="float32")
        if dataclasses.replace(config, dtype="float32") != mine:
            raise ModelError(f"checkpoint {path} was made for {config}, this model is {self.config}")
        params = dict(self.named_parameters())
        expected = set(self.trainable_names())
        if set(tensors) != expected:
            missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
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


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _decoder_source(name_or_path: str) -> tuple[str, bool, str]:
    """(what to pass to from_pretrained, local files only?, the hint a ModelError should give)."""
    path = Path(name_or_path).expanduser()
    looks_like_path = name_or_path.startswith((".", "/", "~")) or path.exists()
    if looks_like_path and not path.is_dir():
        raise ModelError(f"decoder directory {name_or_path} does not exist; pass a directory written by "
                         "save_pretrained or a hub name such as HuggingFaceTB/SmolLM2-135M")
    if looks_like_path:
        return str(path), True, "check that it holds config.json, weights and tokenizer files"
    hint = (f"download it once on a connected machine (`hf download {name_or_path}`, the cache is "
            f"{os.environ.get('HF_HOME', '~/.cache/huggingface')}) or pass --decoder PATH to a local copy")
    if _offline() or _in_local_cache(name_or_path):
        return name_or_path, True, hint  # never touch the network for what is already here
    unreachable = hub_unreachable()
    if unreachable:
        raise ModelError(f"decoder {name_or_path!r} is not in the local Hugging Face cache and {unreachable}; "
                         f"{hint}")
    return name_or_path, False, hint


def _in_local_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # not a valid repo id
        return False


def check_decoder(name_or_path: str) -> None:
    """Fail fast, before hours of extraction, when the decoder cannot be found (reads its config only).

    Raises:
        ModelError: not found or not a transformers model, with how to provide it.
    """
    from transformers import AutoConfig

    source, local_only, hint = _decoder_source(name_or_path)
    try:
        AutoConfig.from_pretrained(source, local_files_only=local_only)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot find decoder {name_or_path!r}: {first_line(e)}; {hint}") from e


def load_decoder(name_or_path: str, dtype: str = "float32"):
    """Load a causal LM and its tokenizer by hub name (local cache) or directory.

    Returns:
        (decoder, tokenizer); the tokenizer's pad token falls back to EOS, as in XARES-LLM.

    Raises:
        ModelError: not found, not loadable, or the tokenizer has no EOS token.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, local_only, hint = _decoder_source(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
        decoder = AutoModelForCausalLM.from_pretrained(source, dtype=DTYPES[dtype], local_files_only=local_only)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load decoder {name_or_path!r}: {first_line(e)}; {hint}") from e
    if tokenizer.eos_token_id is None:
        raise ModelError(f"decoder {name_or_path!r}: its tokenizer has no EOS token; generation could never stop")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return decoder, tokenizer


def build_model(config: ModelConfig, *, seed: int = 42) -> AudioLLM:
    """Load the decoder once, wrap it with LoRA, add the projector; only projector + LoRA train.

    Args:
        config: model settings.
        seed: seeds the projector and LoRA initialisation (the global RNG is left untouched).

    Raises:
        ModelError: the decoder cannot be loaded.
    """
    decoder, tokenizer = load_decoder(config.decoder, config.dtype)
    lora = LoraConfig(
        task_type=TaskType.CAUSAL_LM, inference_mode=False, r=config.lora_r, lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout, target_modules=config.lora_target, bias=config.lora_bias,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        decoder = get_peft_model(decoder, lora)
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
