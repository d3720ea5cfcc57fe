"""Many decoders in one pass: the projectors and LoRA weights of K jobs over one frozen decoder.

Every XARES-LLM decoder of a track repeats the same frozen SmolLM2 computation at batch 4, where a GPU
is mostly idle. A pack loads the decoder once and runs the rows of K jobs (different submissions, any
encoder width or frame rate) through it together: each job's rows through its own projector and its
own LoRA weights, the base matmuls batched across jobs (mLoRA's BatchLoRA idea)::

    pack = DecoderPack(ModelConfig(encoder_dim=768))     # the shared decoder (encoder_dim is ignored)
    a = pack.add_job(ModelConfig(encoder_dim=768), seed=42)
    b = pack.add_job(ModelConfig(encoder_dim=1280), seed=42)
    losses = pack.loss([a, b], [batch_a, batch_b], [stream_a, stream_b])   # one forward, K losses

Each job is what its solo `AudioLLM` would be, to the bit where it can be: the same initial weights
(LoRA injected and removed again under the job's seed), tensors under the same names (checkpoints
move between solo and packed runs), and the same LoRA dropout masks, drawn on the job's own rows and
length from a saved copy of the generator state its solo run would draw from (`DropoutStream`).
Rows of different jobs never meet: attention, norms and the loss are per row, the base is frozen.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from peft import get_peft_model
from torch import nn
from torch.nn import functional as F

from evaluator.errors import ConfigError
from evaluator.model import (
    IGNORE_INDEX,
    Collated,
    ModelConfig,
    TextCodec,
    copy_trainable,
    load_decoder,
    lora_config,
    pack_inputs,
    write_trainable,
)

logger = logging.getLogger(__name__)

PEFT_PREFIX = "base_model.model."  # where peft puts the wrapped model in its parameter names


def shared_part(config: ModelConfig) -> ModelConfig:
    """What jobs must agree on to share a decoder: everything but the encoder width."""
    return dataclasses.replace(config, encoder_dim=1)


class Job(TextCodec, nn.Module):
    """One job of a pack: its projector and LoRA weights, over the pack's decoder.

    Parameters are registered in the order of its solo model's trainable parameters (LoRA A and B of each
    layer, then the projector), so optimizer states and checkpoints are interchangeable with a solo run.
    """

    def __init__(self, config: ModelConfig, pack: DecoderPack, tensors: dict[str, torch.Tensor]):
        super().__init__()
        self.config = config
        # its own copy: on a GPU each job's batches are tokenized by its own thread, and a fast tokenizer
        # shared between threads can fail ("Already borrowed")
        self.tokenizer = copy.deepcopy(pack.tokenizer)
        self._prompt_cache: dict[str, list[int]] = {}
        self._solo_names = list(tensors)
        assert self._solo_names[-2:] == ["projector.weight", "projector.bias"], self._solo_names[-2:]
        for i, name in enumerate(self._solo_names[:-2]):
            self.register_parameter(f"lora_{i}", nn.Parameter(tensors[name].clone()))
        self.projector = nn.Linear(config.encoder_dim, pack.hidden_size)
        with torch.no_grad():
            self.projector.weight.copy_(tensors["projector.weight"])
            self.projector.bias.copy_(tensors["projector.bias"])

    def lora(self, layer: int) -> tuple[nn.Parameter, nn.Parameter]:
        """(A [r, d_in], B [d_out, r]) of one adapted layer."""
        return getattr(self, f"lora_{2 * layer}"), getattr(self, f"lora_{2 * layer + 1}")

    def trainable_names(self) -> list[str]:
        return list(self._solo_names)

    def named_trainables(self) -> list[tuple[str, nn.Parameter]]:
        return list(zip(self._solo_names, self.parameters()))

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().contiguous() for n, p in self.named_trainables()}

    def save_trainable(self, path: Path) -> None:
        write_trainable(path, self.config, self.trainable_state())

    def load_trainable(self, path: Path) -> None:
        copy_trainable(path, self.config, dict(self.named_trainables()))


class DropoutStream:
    """One job's LoRA-dropout random stream: the state of the generator its solo run draws from.

    While entered, the device's default generator holds this job's state (so `F.dropout` draws exactly
    the masks the solo run draws, whatever kernel the device uses); on leaving, the advanced state is kept.
    """

    def __init__(self, device: torch.device, state: torch.Tensor | None = None, *, seed: int = 0):
        self.device = device
        self._gen = (torch.cuda.default_generators[device.index or 0] if device.type == "cuda"
                     else torch.default_generator)
        if state is None:
            state = torch.Generator(device=device).manual_seed(seed).get_state()
        self.state = state

    def __enter__(self) -> DropoutStream:
        self._gen.set_state(self.state)
        return self

    def __exit__(self, *exc) -> None:
        self.state = self._gen.get_state()


@dataclass
class _TrainRoute:
    """Training rows: job k owns rows [k*rows, (k+1)*rows), its real length is lengths[k]."""

    jobs: Sequence[Job]
    rows: int
    lengths: Sequence[int]
    streams: Sequence[DropoutStream]
    dropout: float
    scaling: float

    def apply(self, layer: int, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        k, length = len(self.jobs), x.shape[1]
        a0, _ = self.jobs[0].lora(layer)
        x = x.to(a0.dtype)  # peft casts the input to the LoRA weights' dtype
        parts = []
        for j, (n, stream) in enumerate(zip(self.lengths, self.streams)):
            xj = x[j * self.rows : (j + 1) * self.rows, :n]  # the job's own shape: its solo run's masks
            if self.dropout > 0:
                with stream:
                    xj = F.dropout(xj, self.dropout, training=True)
            parts.append(F.pad(xj, (0, 0, 0, length - n)) if n < length else xj)
        dropped = torch.cat(parts).view(k, self.rows * length, -1)
        a = torch.stack([job.lora(layer)[0] for job in self.jobs])  # [K, r, d_in]
        b = torch.stack([job.lora(layer)[1] for job in self.jobs])  # [K, d_out, r]
        delta = torch.bmm(torch.bmm(dropped, a.transpose(1, 2)), b.transpose(1, 2))
        return (out + delta.view(k * self.rows, length, -1) * self.scaling).to(out.dtype)


@dataclass
class _EvalRoute:
    """Decoding rows: row i belongs to job ``row_job[i]``; no dropout, weights stacked once."""

    row_job: torch.Tensor  # [N] long, on the device
    a: list[torch.Tensor]  # per layer [K, r, d_in]
    b: list[torch.Tensor]  # per layer [K, d_out, r]
    scaling: float

    def apply(self, layer: int, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        a = self.a[layer].index_select(0, self.row_job)  # [N, r, d_in]
        b = self.b[layer].index_select(0, self.row_job)  # [N, d_out, r]
        delta = torch.bmm(torch.bmm(x.to(a.dtype), a.transpose(1, 2)), b.transpose(1, 2))
        return (out + delta * self.scaling).to(out.dtype)

    def select(self, keep: torch.Tensor) -> None:
        """Rows ``keep`` stay in the batch (the decoder dropped finished rows from its cache)."""
        self.row_job = self.row_job.index_select(0, keep)


class DecoderPack:
    """One frozen decoder and the jobs that share it; LoRA runs as forward hooks on its linear layers.

    Raises:
        ModelError: the decoder cannot be loaded.
        ConfigError: a LoRA setting a pack cannot share (LoRA biases).
    """

    def __init__(self, config: ModelConfig):
        if config.lora_bias != "none":
            raise ConfigError(f"a pack needs LoRA without biases (lora_bias={config.lora_bias!r})")
        self.config = shared_part(config)
        self.decoder, self.tokenizer = load_decoder(config.decoder, config.dtype)
        self.decoder.requires_grad_(False)
        self.hidden_size = self.decoder.get_input_embeddings().embedding_dim
        self.layers: list[str] = []  # module paths of the adapted linear layers, in solo parameter order
        self._hooks: list = []
        self._route: _TrainRoute | _EvalRoute | None = None

    @property
    def device(self) -> torch.device:
        return self.decoder.get_input_embeddings().weight.device

    def to(self, device: torch.device) -> DecoderPack:
        self.decoder.to(device)
        return self

    def add_job(self, config: ModelConfig, *, seed: int) -> Job:
        """A new job with the initial weights `build_model(config, seed=seed)` would give its solo model."""
        if shared_part(config) != self.config:
            raise ConfigError(f"job config {config} cannot share the pack's decoder ({self.config})")
        with torch.random.fork_rng(devices=[]):  # the draws build_model makes, in its order
            torch.manual_seed(seed)
            wrapped = get_peft_model(self.decoder, lora_config(config))
            projector = nn.Linear(config.encoder_dim, self.hidden_size)
        tensors = {"decoder." + n: p.detach().float().cpu() for n, p in wrapped.named_parameters() if p.requires_grad}
        self.decoder = wrapped.unload()  # the very same base modules, LoRA layers removed
        self.decoder.requires_grad_(False)
        layers = [n[len("decoder." + PEFT_PREFIX):].split(".lora_A.")[0] for n in tensors if ".lora_A." in n]
        if not self.layers:
            self._hook_layers(layers)
        elif layers != self.layers:
            raise ConfigError("LoRA landed on other layers than for the pack's first job")
        tensors["projector.weight"] = projector.weight.detach()
        tensors["projector.bias"] = projector.bias.detach()
        return Job(config, self, tensors).to(self.device)

    def _hook_layers(self, layers: list[str]) -> None:
        self.layers = layers
        for i, path in enumerate(layers):
            module = self.decoder.get_submodule(path)
            self._hooks.append(module.register_forward_hook(partial(self._hook, i)))

    def _hook(self, layer: int, module, args, out):
        route = self._route
        return None if route is None else route.apply(layer, args[0], out)

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    # ---- training ------------------------------------------------------------------------------
    def body(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor):
        return self.decoder.get_decoder()(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
        ).last_hidden_state

    def loss(self, jobs: Sequence[Job], batches: Sequence[Collated], streams: Sequence[DropoutStream]) -> list[torch.Tensor]:
        """One forward of every job's batch; the mean target cross-entropy of each job, as `AudioLLM.loss`.

        The rows of job k are its collated batch, right-padded to the pack's longest length; the padding is
        masked, so each row computes what it computes alone. Summing the losses gives each job its own
        gradient: no parameter is shared.
        """
        device = self.device
        embed = self.decoder.get_input_embeddings()
        xs = [pack_inputs(job.projector, embed, c.to(device)) for job, c in zip(jobs, batches)]
        rows = xs[0].inputs_embeds.shape[0]
        if any(x.inputs_embeds.shape[0] != rows for x in xs):
            raise ConfigError("packed jobs need the same batch size")
        lengths = [x.inputs_embeds.shape[1] for x in xs]
        length = max(lengths)
        embeds = torch.cat([F.pad(x.inputs_embeds, (0, 0, 0, length - n)) for x, n in zip(xs, lengths)])
        mask = torch.cat([F.pad(x.attention_mask, (0, length - n)) for x, n in zip(xs, lengths)])
        positions = torch.cat([F.pad(x.position_ids, (0, length - n)) for x, n in zip(xs, lengths)])
        self._route = _TrainRoute(jobs, rows, lengths, streams, self.config.lora_dropout,
                                  self.config.lora_alpha / self.config.lora_r)
        try:
            hidden = self.body(embeds, mask, positions)  # [K * rows, L, H]
        finally:
            self._route = None
        picks, counts = [], []
        for k, (c, n) in enumerate(zip(batches, lengths)):
            pos = c.target_pos.to(device)
            pos = (pos // n + k * rows) * length + pos % n  # the job's flat index, in the packed layout
            picks.append(pos)
            counts.append(len(pos))
        logits = self.decoder.get_output_embeddings()(hidden.flatten(0, 1).index_select(0, torch.cat(picks)))
        targets = [c.target_ids.to(device) for c in batches]
        return [F.cross_entropy(part.float(), t, ignore_index=IGNORE_INDEX)
                for part, t in zip(logits.split(counts), targets)]

    # ---- decoding ------------------------------------------------------------------------------
    def eval_route(self, jobs: Sequence[Job]) -> _EvalRoute:
        """Stack the jobs' LoRA weights for decoding (rows are assigned with `use`)."""
        with torch.no_grad():
            a = [torch.stack([job.lora(i)[0].detach() for job in jobs]) for i in range(len(self.layers))]
            b = [torch.stack([job.lora(i)[1].detach() for job in jobs]) for i in range(len(self.layers))]
        return _EvalRoute(torch.zeros(0, dtype=torch.long, device=self.device), a, b,
                          self.config.lora_alpha / self.config.lora_r)

    def use(self, route: _EvalRoute | None) -> None:
        """Route the decoder's forward calls through ``route`` (None: the bare base decoder)."""
        self._route = route


MAX_PACK = 16  # jobs per pack with --pack auto: beyond this the per-job work dominates on any device
MEMORY_SHARE = 0.7  # of the free memory a pack's activations may take with --pack auto


def activation_bytes(pack: DecoderPack, job: Job, rows: int, length: int) -> float:
    """Bytes autograd keeps for one job's batch of ``rows`` x ``length`` positions, measured, not guessed.

    Two short forwards with every saved tensor counted give the bytes per position (a line through
    both), extrapolated to ``length``; attention that keeps its score matrix grows faster, hence the
    margin `capacity` leaves.
    """
    def saved(n: int) -> int:
        total = 0

        def count(t: torch.Tensor):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        batch = Collated(
            features=torch.zeros(rows, 1, job.config.encoder_dim), text_ids=torch.zeros(rows, n - 1, dtype=torch.long),
            source=torch.arange(n)[None].expand(rows, n) + (torch.arange(rows)[:, None] * (n + 1)),
            attention_mask=torch.ones(rows, n, dtype=torch.long), position_ids=torch.arange(n)[None].expand(rows, n),
            target_pos=torch.arange(rows) * n, target_ids=torch.zeros(rows, dtype=torch.long))
        stream = DropoutStream(pack.device, seed=0)
        devices = [pack.device.index or 0] if pack.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.autograd.graph.saved_tensors_hooks(count, lambda t: t):
            loss = pack.loss([job], [batch], [stream])[0]
        del loss
        return total

    short, long = saved(32), saved(96)
    per_position = max(0.0, (long - short) / (64 * rows))
    return short + per_position * rows * (length - 32)


def capacity(pack: DecoderPack, job: Job, rows: int, length: int, *, free_bytes: float, limit: int = MAX_PACK) -> int:
    """How many jobs of ``rows`` x ``length`` fit ``free_bytes``: activations, gradients and two Adam moments."""
    trainable = sum(p.numel() * 4 for p in job.parameters()) * 4  # weights, grads, exp_avg, exp_avg_sq
    per_job = 1.5 * activation_bytes(pack, job, rows, length) + trainable
    return int(max(1, min(limit, MEMORY_SHARE * free_bytes // per_job)))


def free_memory(device: torch.device) -> float:
    """Bytes free for a pack on ``device``: the GPU's free memory, or the host's available memory."""
    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return float(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
