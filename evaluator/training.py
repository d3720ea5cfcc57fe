"""Train the projector + LoRA on cached features, with XARES-LLM's hyper-parameters.

The loop reads the feature store only (the encoder never runs here) and is explicit, nanoGPT-style:
set the learning rate, forward, backward, clip, step, zero the gradients, log, checkpoint. Checkpoints
hold the trainable weights, the optimizer, the RNG state, the step, the loss history and the sampler's
position, so a run killed at any point resumes to bit-for-bit the same weights (fp32 mode)::

    model = build_model(ModelConfig(encoder_dim=768))
    result = train(model, [esc50, gtzan], [0.5, 1.0], TrainConfig(max_steps=2000), Path("run/train"))

`train_packed` trains several submissions' decoders in one forward/backward over a shared frozen decoder
(`evaluator.pack`), each job exactly as its solo `train` would (same batches, masks, checkpoints).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import queue
import shutil
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from evaluator import compute
from evaluator.compute import COMPILE_MODES
from evaluator.data.specs import Prompt, choose_prompt
from evaluator.errors import ConfigError, DataError, XaresError
from evaluator.model import AudioLLM, Batch, Collated
from evaluator.pack import DecoderPack, DropoutStream, Job
from evaluator.progress import progress as progress_of

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16")
CHECKPOINT_PREFIX = "checkpoint-"
FINAL_WEIGHTS = "trainable.safetensors"  # in out_dir once training is complete


class FeatureDataset(Protocol):  # the features stage's interface (docs/architecture.md)
    task: str
    prompt: Prompt  # a tuple: one drawn per sample

    def __len__(self) -> int: ...
    def key(self, i: int) -> str: ...
    def features(self, i: int) -> np.ndarray: ...
    def targets(self, i: int) -> tuple[str, ...]: ...
    def sample_prompt(self, i: int) -> str | None: ...
    def seconds(self, i: int) -> float: ...  # the clip's duration (the batch order sorts by it)


@dataclass(frozen=True)
class TrainConfig:
    """Training settings. Defaults are XARES-LLM's (HF Trainer defaults where it sets nothing)."""

    max_steps: int = 100_000  # optimizer steps (the official tracks use 100000)
    # optimizer (AdamW) and schedule
    learning_rate: float = 1e-4  # peak, after warm-up
    warmup_steps: int = 200  # linear warm-up from 0, then linear decay to 0 at max_steps
    weight_decay: float = 0.01  # not applied to biases
    max_grad_norm: float = 1.0  # global L2 clip
    # data
    batch_size: int = 4
    sort_buffer: int = 128  # examples drawn, sorted by length and cut into batches at a time
    crop_frames: int | None = None  # random crop of longer clips (30 s of the encoder's frames); None: off
    crop_align: int = 1  # crops start at a multiple of this (a fixed-frame encoder's frames per window)
    # with crop_align > 1: keep, per clip, the number of whole windows whose audio is closest to this many
    # seconds (a 30.01 s clip encoded as two 15 s windows keeps both, as the reference's 30 s audio crop)
    crop_seconds: float | None = None
    seed: int = 42
    # execution (these do not change the result, except precision)
    precision: str = "fp32"  # fp32: deterministic and reproducible | bf16: autocast, faster, not bitwise stable
    device: str = "auto"  # auto | cpu | cuda | cuda:N (auto: the first GPU torch sees, else the CPU)
    compile: str = "auto"  # graph capture of the decoder: auto (CUDA only) | on | off
    compile_backend: str | None = None  # None: by device and precision (compute.compiled); tests: aot_eager
    threads: int | None = None  # torch CPU threads; None: the cores this process may use
    checkpoint_every: int = 200  # steps between checkpoints (one is also written at the end)
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    log_every: int = 100  # steps between loss log lines

    def __post_init__(self):
        problems = []
        if self.max_steps < 1:
            problems.append(f"max_steps must be >= 1 (got {self.max_steps})")
        if self.warmup_steps < 0:
            problems.append(f"warmup_steps must be >= 0 (got {self.warmup_steps})")
        if self.learning_rate <= 0 or self.weight_decay < 0 or self.max_grad_norm <= 0:
            problems.append("learning_rate and max_grad_norm must be > 0, weight_decay >= 0")
        if self.batch_size < 1 or self.sort_buffer < self.batch_size:
            problems.append(f"need 1 <= batch_size <= sort_buffer (got {self.batch_size}, {self.sort_buffer})")
        if self.crop_frames is not None and self.crop_frames < 1:
            problems.append(f"crop_frames must be >= 1 or None (got {self.crop_frames})")
        if self.crop_align < 1:
            problems.append(f"crop_align must be >= 1 (got {self.crop_align})")
        if self.crop_seconds is not None and not self.crop_seconds > 0:
            problems.append(f"crop_seconds must be > 0 or None (got {self.crop_seconds})")
        if self.precision not in PRECISIONS:
            problems.append(f"precision must be one of {PRECISIONS} (got {self.precision!r})")
        if self.threads is not None and self.threads < 1:
            problems.append(f"threads must be >= 1 or None (got {self.threads})")
        if self.compile not in COMPILE_MODES:
            problems.append(f"compile must be one of {COMPILE_MODES} (got {self.compile!r})")
        if self.checkpoint_every < 1 or self.keep_checkpoints < 1 or self.log_every < 1:
            problems.append("checkpoint_every, keep_checkpoints and log_every must be >= 1")
        if problems:
            raise ConfigError("invalid training config: " + "; ".join(problems))

    def identity(self) -> dict:
        """The fields that shape the trained weights (a checkpoint is only resumed when they match)."""
        skip = {"threads", "device", "compile", "compile_backend", "checkpoint_every", "keep_checkpoints", "log_every"}
        if self.crop_align == 1:  # the default leaves the identity of every earlier run unchanged
            skip.add("crop_align")
        if self.crop_seconds is None:
            skip.add("crop_seconds")
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}


@dataclass
class TrainResult:
    steps: int  # optimizer steps done in total
    losses: list[float] = field(repr=False)  # one per step, including steps before a resume
    weights: Path = Path()  # projector + LoRA safetensors of the final model
    resumed_from: int | None = None  # step of the checkpoint this call started from
    seconds: float = 0.0  # wall time of this call


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based), HF Trainer's "linear" schedule."""
    # 1) linear warm-up from 0 (as in HF, the very first step runs at lr 0)
    if step < cfg.warmup_steps:
        return cfg.learning_rate * step / cfg.warmup_steps
    # 2) linear decay to 0 at max_steps
    return cfg.learning_rate * max(0.0, (cfg.max_steps - step) / max(1, cfg.max_steps - cfg.warmup_steps))


class BatchSampler:
    """Deterministic, resumable stream of training batches over several datasets.

    The unit drawn is XARES-LLM's sample, one (clip, target text) pair: a clip with three captions is
    three samples, so a task's share of the stream is its mixture weight whatever its texts per clip.
    Buffer k draws ``sort_buffer`` samples (dataset by probability, pairs in a per-epoch permutation),
    sorts them by XARES-LLM's length key (text tokens + audio seconds), cuts them into batches (an
    incomplete last batch is dropped, as XARES-LLM does) and shuffles the batch order. Everything random
    comes from ``seed`` and k, so the state is just (k, cursors at the start of buffer k, batches taken).
    """

    def __init__(self, model: AudioLLM, datasets: Sequence[FeatureDataset], probs: Sequence[float], cfg: TrainConfig):
        self.model, self.datasets, self.cfg = model, list(datasets), cfg
        self.probs = _normalise(probs, len(self.datasets))
        self.state = {"buffer": 0, "cursors": [[0, 0] for _ in self.datasets], "taken": 0}
        self._batches: list[Batch] | None = None
        self._orders: dict[tuple[int, int], np.ndarray] = {}  # (dataset, epoch) -> pair permutation
        self._pairs: dict[int, np.ndarray] = {}  # dataset -> [N, 2] (item, text index)

    def state_dict(self) -> dict:
        return json.loads(json.dumps(self.state))

    def load_state_dict(self, state: dict) -> None:
        self.state = json.loads(json.dumps(state))
        self._batches = None

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        while True:
            if self._batches is None:
                self._cursors = [list(c) for c in self.state["cursors"]]  # advanced while filling
                self._batches = self._fill(self.state["buffer"])
            if self.state["taken"] < len(self._batches):
                batch = self._batches[self.state["taken"]]
                self.state["taken"] += 1
                return batch
            self.state = {"buffer": self.state["buffer"] + 1, "cursors": self._cursors, "taken": 0}
            self._batches = None

    def _samples(self, d: int) -> np.ndarray:
        if d not in self._pairs:
            ds = self.datasets[d]
            pairs = [(i, j) for i in range(len(ds)) for j in range(len(ds.targets(i)))]
            if not pairs:
                raise DataError(f"task {ds.task}: no training sample (no clip has a target text)")
            self._pairs[d] = np.asarray(pairs, dtype=np.int64)
        return self._pairs[d]

    def _next_sample(self, d: int) -> tuple[int, int]:
        pairs = self._samples(d)
        epoch, pos = self._cursors[d]
        n = len(pairs)
        if (d, epoch) not in self._orders:
            self._orders = {key: v for key, v in self._orders.items() if key[0] != d}
            self._orders[d, epoch] = np.random.default_rng([self.cfg.seed, 1 + d, epoch]).permutation(n)
        item, text = pairs[self._orders[d, epoch][pos]]
        self._cursors[d] = [epoch + 1, 0] if pos + 1 == n else [epoch, pos + 1]
        return int(item), int(text)

    def _crop_frames(self, ds: FeatureDataset, i: int, frames: int) -> int | None:
        """Frames a training crop keeps: crop_frames, or for windowed fixed-frame features the whole
        windows closest to crop_seconds of this clip's audio (its windows are equal: clip seconds / count)."""
        cfg = self.cfg
        windows = frames // cfg.crop_align
        if not cfg.crop_frames or cfg.crop_align == 1 or not cfg.crop_seconds or windows < 2:
            return cfg.crop_frames
        keep = max(1, round(cfg.crop_seconds * windows / ds.seconds(i)))
        return keep * cfg.crop_align

    def _fill(self, k: int) -> list[Batch]:
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, 0, k])
        examples = []
        while len(examples) < cfg.sort_buffer:
            d = int(rng.choice(len(self.datasets), p=self.probs))
            ds = self.datasets[d]
            i, j = self._next_sample(d)
            feats = np.array(ds.features(i), dtype=np.float32)  # a copy: torch wants writable memory
            if feats.ndim != 2 or feats.shape[0] == 0 or feats.shape[1] != self.model.config.encoder_dim:
                raise DataError(f"task {ds.task}, item {ds.key(i)}: features have shape {feats.shape}, expected "
                                f"[T>0, {self.model.config.encoder_dim}]")
            if not np.isfinite(feats).all():
                raise DataError(f"task {ds.task}, item {ds.key(i)}: features contain NaN or Inf")
            frames = feats.shape[0]
            crop = self._crop_frames(ds, i, frames)
            if crop and feats.shape[0] > crop:
                start = cfg.crop_align * int(rng.integers(0, (feats.shape[0] - crop) // cfg.crop_align + 1))
                feats = feats[start : start + crop]
            draw = int(rng.integers(len(ds.prompt))) if isinstance(ds.prompt, tuple) else 0
            prompt = self.model.prompt_ids(choose_prompt(ds.prompt, ds.sample_prompt(i), draw=draw))
            target = self.model.target_ids(ds.targets(i)[j])
            seconds = ds.seconds(i) * feats.shape[0] / frames  # of the audio these frames cover, after a crop
            examples.append((torch.from_numpy(feats), prompt, target, len(prompt) + len(target) + seconds))
        # longest first, then cut; ties keep draw order so the result is deterministic
        # XARES-LLM's order: longest first by text tokens + audio seconds (its sort_by_length key), so a
        # batch holds texts of about one length; ties keep draw order, so the result is deterministic
        examples.sort(key=lambda e: -e[3])
        cut = [examples[j : j + cfg.batch_size] for j in range(0, len(examples) - cfg.batch_size + 1, cfg.batch_size)]
        order = rng.permutation(len(cut))
        return [Batch(features=[e[0] for e in cut[j]], prompt_ids=[e[1] for e in cut[j]],
                      target_ids=[e[2] for e in cut[j]]) for j in order]


def _normalise(probs: Sequence[float], n: int) -> np.ndarray:
    if n == 0:
        raise ConfigError("training needs at least one dataset")
    p = np.asarray(probs, dtype=np.float64)
    if p.shape != (n,) or not np.isfinite(p).all() or (p < 0).any() or p.sum() <= 0:
        raise ConfigError(f"need one non-negative sampling weight per dataset with a positive sum, got {list(probs)}")
    return p / p.sum()


def _make_optimizer(model: AudioLLM, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in params if not n.endswith("bias")], "weight_decay": cfg.weight_decay},
        {"params": [p for n, p in params if n.endswith("bias")], "weight_decay": 0.0},
    ]
    # fused: one kernel for all parameters on a GPU (the same update; tests compare it on the CPU)
    fused = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(0.9, 0.999), eps=1e-8, **fused)


def _checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    found = []
    for p in out_dir.glob(CHECKPOINT_PREFIX + "*"):
        suffix = p.name[len(CHECKPOINT_PREFIX):]
        if p.is_dir() and suffix.isdigit() and (p / "state.pt").is_file():
            found.append((int(suffix), p))
    return sorted(found)


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _global_rng(device: torch.device) -> dict[str, torch.Tensor]:
    """The generator states a solo run's checkpoint holds (LoRA dropout draws on the device's own)."""
    rng = {"torch_rng": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda_rng"] = torch.cuda.get_rng_state(device)
    return rng


def _set_global_rng(rng: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(rng["torch_rng"])
    if device.type == "cuda" and "cuda_rng" in rng:
        torch.cuda.set_rng_state(rng["cuda_rng"], device)


def _save_checkpoint(out_dir: Path, step: int, model, optimizer, sampler_state: dict, losses, cfg: TrainConfig,
                     rng: dict[str, torch.Tensor], threads: int | None = None) -> Path:
    """Write into a temporary directory, then rename: a kill never leaves a half checkpoint behind."""
    final = out_dir / f"{CHECKPOINT_PREFIX}{step:08d}"
    tmp = out_dir / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_trainable(tmp / FINAL_WEIGHTS)
    state = {
        "step": step,
        "optimizer": _to_cpu(optimizer.state_dict()),  # device-independent: resumes on a CPU or a GPU
        **rng,
        "sampler": json.dumps(sampler_state),
        "losses": torch.tensor(losses, dtype=torch.float64),
        "train_config": json.dumps(cfg.identity(), sort_keys=True),
        "model_config": json.dumps(model.config.to_dict(), sort_keys=True),
    }
    if threads:
        state["cpu_threads"] = threads  # for the record: fp32 bits depend on it
    torch.save(state, tmp / "state.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for _, old in _checkpoints(out_dir)[: -cfg.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _resume(out_dir: Path, model, optimizer, sampler, cfg: TrainConfig) -> tuple[int, list[float], dict] | None:
    """Load the newest checkpoint of ``out_dir`` into model, optimizer and sampler.

    Returns:
        (step, losses, generator states) or None when there is none; the caller puts the states back.
    """
    found = _checkpoints(out_dir)
    if not found:
        return None
    step, path = found[-1]
    state = torch.load(path / "state.pt", weights_only=True, map_location="cpu")
    if json.loads(state["train_config"]) != cfg.identity() or json.loads(state["model_config"]) != model.config.to_dict():
        raise ConfigError(f"{path} was written by another training or model config; use a fresh output "
                          "directory (outputs are keyed by their settings) or delete it")
    model.load_trainable(path / FINAL_WEIGHTS)
    optimizer.load_state_dict(state["optimizer"])
    sampler.load_state_dict(json.loads(state["sampler"]))
    logger.info("resuming training from %s (step %d)", path, step)
    return step, state["losses"].tolist(), {k: state[k] for k in ("torch_rng", "cuda_rng") if k in state}


def train(
    model: AudioLLM,
    datasets: Sequence[FeatureDataset],
    probs: Sequence[float],
    cfg: TrainConfig,
    out_dir: Path,
    progress: bool = True,
    *,
    stop_at_step: int | None = None,
) -> TrainResult:
    """Train ``model`` in place, resuming from the newest checkpoint in ``out_dir`` if there is one.

    Args:
        model: from `build_model`; its projector and LoRA weights are updated in place.
        datasets: training FeatureDatasets (one per task).
        probs: sampling weight per dataset (normalised here), e.g. the track's ``prob`` values.
        cfg: training settings.
        out_dir: holds checkpoints and, at the end, ``trainable.safetensors``.
        progress: show a progress bar.
        stop_at_step: stop after this step without a checkpoint, as if killed (for tests and time boxes).

    Returns:
        TrainResult with the loss of every step and the path of the final weights.

    Raises:
        ConfigError: bad weights, or ``out_dir`` holds checkpoints of another config.
        DataError: a dataset yields unusable features or no target text.
    """
    t0 = time.monotonic()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for leftover in out_dir.glob(".tmp-*"):  # a checkpoint interrupted while being written
        shutil.rmtree(leftover, ignore_errors=True)
    device = compute.resolve_device(cfg.device)
    model.to(device)
    sampler = BatchSampler(model, datasets, probs, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    deterministic = cfg.precision == "fp32"
    threads = compute.cpu_threads(cfg.threads) if device.type == "cpu" else None
    with compute.execution(device, deterministic=deterministic, threads=threads, seed=cfg.seed), \
            compute.graph_cache():
        optimizer = _make_optimizer(model, cfg, device)
        resumed = _resume(out_dir, model, optimizer, sampler, cfg)
        start, losses = resumed[:2] if resumed else (0, [])
        if resumed:
            _set_global_rng(resumed[2], device)
        end = cfg.max_steps if stop_at_step is None else min(cfg.max_steps, stop_at_step)
        body = None
        if compute.use_compile(cfg.compile, device):
            fast = compute.compiled(model.body, device=device, exact=deterministic, backend=cfg.compile_backend)
            body = compute.Fallback(fast, model.body, "training")
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
        # On a GPU the loss stays on the device and is read back only every log_every steps: a read is a
        # host synchronisation, and at batch 4 the GPU would idle through each one. A CPU reads every step.
        read_every = 1 if device.type == "cpu" else cfg.log_every
        pending: list[torch.Tensor] = []
        sampler_state = sampler.state_dict()
        model.train()
        with progress_of("training", total=cfg.max_steps, completed=start, enabled=progress) as bar, \
                _batches(model, sampler, device, bucket=body is not None) as stream:
            for step in range(start, end):
                lr = learning_rate(step, cfg)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                collated, sampler_state = next(stream)
                loss = _forward_backward(model, collated, body, autocast)
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                pending.append(loss.detach())
                done = step + 1
                checkpoint = _bookkeep(done, end, cfg, losses, pending, read_every)
                if not pending:  # just read back
                    bar.set(done, f"loss {losses[-1]:.3f}")
                if checkpoint:
                    _save_checkpoint(out_dir, done, model, optimizer, sampler_state, losses, cfg, _global_rng(device), threads)
        model.eval()
        if body is not None and body.failed:
            logger.warning("training ran in eager mode: %s", body.failed)
    return TrainResult(steps=len(losses), losses=losses, weights=_final_weights(model, out_dir, losses, cfg),
                       resumed_from=resumed[0] if resumed else None, seconds=time.monotonic() - t0)


def _final_weights(model, out_dir: Path, losses: list[float], cfg: TrainConfig) -> Path:
    """Where the trained weights go; written once every step is done."""
    weights = out_dir / FINAL_WEIGHTS
    if len(losses) == cfg.max_steps:
        model.save_trainable(weights)
    return weights


def _bookkeep(done: int, end: int, cfg: TrainConfig, losses: list[float], pending: list[torch.Tensor],
              read_every: int, who: str = "") -> bool:
    """After step ``done``: read the pending losses back when due, log, and say whether a checkpoint is due.

    Raises:
        DataError: a non-finite loss (before any checkpoint of it).
    """
    checkpoint = done % cfg.checkpoint_every == 0 or done == cfg.max_steps
    if checkpoint or done % read_every == 0 or done == end:
        losses.extend(_read_losses(pending, first_step=done - len(pending)))
        pending.clear()
    if done % cfg.log_every == 0 or done == cfg.max_steps:
        recent = losses[-cfg.log_every:]
        logger.info("%sstep %d/%d  loss %.4f  lr %.2e", who, done, cfg.max_steps, sum(recent) / len(recent),
                    learning_rate(done - 1, cfg))
    return checkpoint


@dataclass
class PackedJob:
    """One decoder of a pack: what `train` takes for its solo run, with a `pack.Job` as its model."""

    name: str  # for messages (the submission)
    model: Job
    datasets: Sequence[FeatureDataset]
    probs: Sequence[float]
    cfg: TrainConfig
    out_dir: Path


@dataclass
class PackedOutcome:
    name: str
    result: TrainResult | None = None  # None when the job failed
    error: XaresError | None = None  # why it left the pack


SHARED_SETTINGS = ("device", "precision", "threads", "batch_size", "compile")  # one value for a whole pack


class _Lane:
    """A job's own training state inside a pack: sampler, optimizer, schedule, dropout stream, losses."""

    def __init__(self, job: PackedJob, device: torch.device, stop_at_step: int | None):
        self.job, self.cfg, self.device = job, job.cfg, device
        self.end = job.cfg.max_steps if stop_at_step is None else min(job.cfg.max_steps, stop_at_step)
        self.t0 = time.monotonic()
        job.out_dir.mkdir(parents=True, exist_ok=True)
        for leftover in job.out_dir.glob(".tmp-*"):  # a checkpoint interrupted while being written
            shutil.rmtree(leftover, ignore_errors=True)
        self.sampler = BatchSampler(job.model, job.datasets, job.probs, job.cfg)
        self.params = [p for p in job.model.parameters() if p.requires_grad]
        self.optimizer = _make_optimizer(job.model, job.cfg, device)
        self.resumed = _resume(job.out_dir, job.model, self.optimizer, self.sampler, job.cfg)
        self.step, self.losses = self.resumed[:2] if self.resumed else (0, [])
        rng = self.resumed[2] if self.resumed else {}
        seeded = torch.Generator().manual_seed(job.cfg.seed).get_state()  # what execution(seed=) sets
        self.cpu_rng = rng.get("torch_rng", seeded)
        draw_state = rng.get("cuda_rng") if device.type == "cuda" else self.cpu_rng
        self.stream = DropoutStream(device, draw_state, seed=job.cfg.seed)
        self.pending: list[torch.Tensor] = []
        self.sampler_state = self.sampler.state_dict()
        self.batches = None

    def rng(self) -> dict[str, torch.Tensor]:
        """Generator states for a checkpoint, as the solo run writes them."""
        if self.device.type == "cuda":
            return {"torch_rng": self.cpu_rng, "cuda_rng": self.stream.state}
        return {"torch_rng": self.stream.state}

    def result(self) -> TrainResult:
        weights = _final_weights(self.job.model, self.job.out_dir, self.losses, self.cfg)
        return TrainResult(steps=len(self.losses), losses=self.losses, weights=weights,
                           resumed_from=self.resumed[0] if self.resumed else None,
                           seconds=time.monotonic() - self.t0)


def train_packed(pack: DecoderPack, jobs: Sequence[PackedJob], progress: bool = True, *,
                 stop_at_step: int | None = None) -> list[PackedOutcome]:
    """Train K decoders in lockstep over the pack's one frozen decoder; each as its solo `train` would.

    Every job keeps its sampler, dropout stream, optimizer, schedule, gradient clipping, checkpoints and
    resume, in the solo format: each job's batches and masks are those of its solo run, and a packed
    run resumes solo or the other way round. A job whose data breaks or whose loss turns non-finite
    leaves the pack with its reason (no checkpoint of the bad step); the others go on.

    Args:
        pack: the shared decoder; jobs come from ``pack.add_job``.
        jobs: the decoders to train; their configs agree on `SHARED_SETTINGS`.
        progress: one progress bar for the pack.
        stop_at_step: stop every job after this step without a checkpoint, as if killed (tests).

    Returns:
        One PackedOutcome per job, in order.

    Raises:
        ConfigError: the jobs disagree on a shared setting.
    """
    if not jobs:
        return []
    first = jobs[0].cfg
    for job in jobs[1:]:
        differ = [k for k in SHARED_SETTINGS if getattr(job.cfg, k) != getattr(first, k)]
        if differ:
            raise ConfigError(f"{job.name} cannot share a pack with {jobs[0].name}: {', '.join(differ)} differ")
    device = compute.resolve_device(first.device)
    pack.to(device)
    deterministic = first.precision == "fp32"
    threads = compute.cpu_threads(first.threads) if device.type == "cpu" else None
    outcomes = {job.name: PackedOutcome(job.name) for job in jobs}
    # the shapes (and so the dropout masks) of each job's solo run, which buckets lengths when it captures graphs
    bucket = compute.use_compile(first.compile, device)
    if bucket:
        logger.info("packed training runs eagerly (each job's dropout stream is swapped in per layer)")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=first.precision == "bf16")
    read_every = 1 if device.type == "cpu" else first.log_every
    with compute.execution(device, deterministic=deterministic, threads=threads, seed=None), \
            contextlib.ExitStack() as stack:
        lanes: list[_Lane] = []
        for job in jobs:
            job.model.to(device)
            try:
                lane = _Lane(job, device, stop_at_step)
            except XaresError as e:
                outcomes[job.name].error = e
                logger.warning("%s leaves the pack: %s", job.name, e)
                continue
            lane.batches = stack.enter_context(_batches(job.model, lane.sampler, device, bucket=bucket))
            lanes.append(lane)
        for lane in [lane for lane in lanes if lane.step >= lane.end]:  # finished before: nothing to run
            outcomes[lane.job.name].result = lane.result()
            lanes.remove(lane)

        def drop(lane: _Lane, error: XaresError) -> None:
            outcomes[lane.job.name].error = error
            logger.warning("%s leaves the pack at step %d: %s", lane.job.name, lane.step, error)
            lanes.remove(lane)

        pack.decoder.train()
        total = sum(lane.end for lane in lanes)
        completed = sum(lane.step for lane in lanes)
        with progress_of("training", total=total, completed=completed, unit="job-steps", enabled=progress) as bar:
            while lanes:
                ready = []
                for lane in list(lanes):
                    for group in lane.optimizer.param_groups:
                        group["lr"] = learning_rate(lane.step, lane.cfg)
                    try:
                        collated, lane.sampler_state = next(lane.batches)
                    except XaresError as e:
                        drop(lane, e)
                        continue
                    ready.append((lane, collated))
                if not ready:
                    break
                with autocast:
                    losses = pack.loss([lane.job.model for lane, _ in ready], [c for _, c in ready],
                                       [lane.stream for lane, _ in ready])
                torch.stack(losses).sum().backward()
                for (lane, _), loss in zip(ready, losses):
                    torch.nn.utils.clip_grad_norm_(lane.params, lane.cfg.max_grad_norm)
                    lane.optimizer.step()
                    lane.optimizer.zero_grad(set_to_none=True)
                    lane.pending.append(loss.detach())
                    lane.step += 1
                    try:
                        finished = _after_step(lane, read_every, threads)
                    except DataError as e:
                        drop(lane, e)
                        continue
                    if finished:
                        outcomes[lane.job.name].result = lane.result()
                        lanes.remove(lane)
                completed += len(ready)
                bar.set(completed, f"{len(lanes)} decoders")
        pack.decoder.eval()
    return [outcomes[job.name] for job in jobs]


def _after_step(lane: _Lane, read_every: int, threads: int | None) -> bool:
    """Losses, log and checkpoint of one job after its step, as the solo loop does them; True at its end.

    Raises:
        DataError: a non-finite loss (before any checkpoint of it).
    """
    if _bookkeep(lane.step, lane.end, lane.cfg, lane.losses, lane.pending, read_every, who=f"{lane.job.name}: "):
        _save_checkpoint(lane.job.out_dir, lane.step, lane.job.model, lane.optimizer, lane.sampler_state,
                         lane.losses, lane.cfg, lane.rng(), threads)
    return lane.step == lane.end


def _forward_backward(model: AudioLLM, collated: Collated, body, autocast) -> torch.Tensor:
    """Loss and gradients of one batch; a captured graph that fails in its backward falls back to eager too."""
    try:
        with autocast:
            loss = model.loss(collated, body)
        loss.backward()
        return loss
    except Exception as e:
        if body is None or body.failed is not None or isinstance(e, XaresError):
            raise
        body.disable(e)
        model.zero_grad(set_to_none=True)
        with autocast:
            loss = model.loss(collated, body)
        loss.backward()
        return loss


def _read_losses(pending: list[torch.Tensor], first_step: int) -> list[float]:
    """Bring the losses of the last steps to the host; a non-finite one stops training before any checkpoint."""
    if not pending:
        return []
    values = torch.stack(pending).float().tolist()
    for i, v in enumerate(values):
        if not np.isfinite(v):
            raise DataError(f"training loss is {v} at step {first_step + i}; check the features for extreme values")
    return values


@contextlib.contextmanager
def _batches(model: AudioLLM, sampler: BatchSampler, device: torch.device, *, bucket: bool,
             prefetch: bool | None = None):
    """Collated batches, each with the sampler state after it (what a checkpoint must hold).

    On a GPU (``prefetch`` None) a thread draws and collates the next batches into page-locked memory
    while the device computes; the sampler is deterministic, so running ahead changes only the timing.
    """
    pin = device.type == "cuda"

    def produce() -> tuple[Collated, dict]:
        collated = model.collate(next(sampler), "right", bucket=bucket)
        return (collated.pin() if pin else collated), sampler.state_dict()

    if not (device.type == "cuda" if prefetch is None else prefetch):
        yield _Calls(produce)
        return
    ahead = _Prefetch(produce, depth=4)
    try:
        yield ahead
    finally:
        ahead.close()


class _Calls:
    def __init__(self, fn):
        self.fn = fn

    def __next__(self):
        return self.fn()


class _Prefetch:
    """Runs ``fn`` ahead in a thread; its exceptions come out of `__next__` in order."""

    def __init__(self, fn, depth: int):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True, name="batch-prefetch")
        self._thread.start()

    def _run(self, fn) -> None:
        while not self._stop.is_set():
            try:
                item = (fn(), None)
            except BaseException as e:  # handed to the consumer, which raises it
                item = (None, e)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item[1] is not None:
                return

    def __next__(self):
        value, error = self._queue.get()
        if error is not None:
            raise error
        return value

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
