"""Task and track descriptions: what a stage needs to know about a task, and nothing about how it was read.

A `TaskSpec` is one evaluation task (a train entry and/or an eval entry of XARES-LLM's YAML, paired by
name); a `TrackSpec` is the set of tasks one decoder is trained on (or scored with) plus the top-level
training fields of the train YAML. Both are frozen: they are built once by `evaluator.data.xares_yaml`
or `evaluator.data.tasks.get_track` and passed down unchanged.
"""

from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from evaluator.data.patterns import expand_braces

Split = Literal["train", "test"]
Prompt = str | tuple[str, ...]  # one prompt, or XARES-LLM's prompt list (one drawn per sample)
SPLITS: tuple[str, ...] = ("train", "test")

# Top-level train-YAML fields with their XARES-LLM defaults (used when the YAML omits them).
DEFAULT_DECODER = "HuggingFaceTB/SmolLM2-135M"


def choose_prompt(prompt: Prompt, sample_prompt: str | None = None, *, draw: int = 0) -> str:
    """The prompt of one sample, by XARES-LLM's rule.

    A prompt list gives one of its prompts per sample (``draw`` picks it: the training sampler passes a
    random number, generation `prompt_draw` of the clip's key, so an answer never depends on batching);
    an empty task prompt gives way to the clip's own (a ``<key>.prompt`` member); otherwise the task's.
    """
    if isinstance(prompt, tuple):
        return prompt[draw % len(prompt)]
    if prompt == "" and sample_prompt:
        return sample_prompt
    return prompt


def prompt_draw(key: str) -> int:
    """A stable per-clip number for `choose_prompt` at evaluation (the same in every run and process)."""
    return zlib.crc32(key.encode("utf-8"))


@dataclass(frozen=True)
class TaskSpec:
    """One task: where its shards are, how to read labels, how it is prompted and scored.

    Shard patterns are repo-relative when ``repo_id``/``train_repo_id`` is set (resolved under the data
    cache), otherwise absolute local patterns (braces and globs allowed).
    """

    id: str  # lower case, the eval name without "eval_" (e.g. "esc-50"); safe as a folder name
    name: str  # the train name (e.g. "ESC-50"), or the id for eval-only tasks
    track: str  # the track this task belongs to ("A", "B-hidden", "demo-a", ...)
    hidden: bool = False
    prompt: Prompt = ""  # prompt at evaluation (the train prompt for train-only tasks); a tuple: drawn per sample
    train_keys: tuple[str, ...] = ()  # json label keys tried in order when reading train shards
    eval_keys: tuple[str, ...] = ()  # ... and test shards
    metric: str | None = None  # None: trained on, not scored
    metric_args: dict[str, Any] = field(default_factory=dict, hash=False)
    train_shards: tuple[str, ...] = ()  # empty: eval-only task (e.g. B-hidden, scored by the B decoder)
    test_shards: tuple[str, ...] = ()  # empty: train-only task
    repo_id: str | None = None  # HF dataset repo of the test shards (None: local files)
    prob: float | None = None  # training mixture weight; None: proportional to the number of shards
    batch_size: int = 32  # evaluation batch size
    num_workers: int = 0  # evaluation loader workers (XARES-LLM field, informative here)
    weight: float = 1.0  # XARES-LLM eval field, kept for completeness
    train_prompt: Prompt | None = None  # only when the train YAML's prompt differs from ``prompt``
    train_repo_id: str | None = None  # HF dataset repo of the train shards (None: local files)

    @property
    def prompt_for_training(self) -> Prompt:
        return self.prompt if self.train_prompt is None else self.train_prompt

    def shards(self, split: Split) -> tuple[str, ...]:
        """Shard patterns of one split ("train" or "test")."""
        _check_split(split)
        return self.train_shards if split == "train" else self.test_shards

    def repo(self, split: Split) -> str | None:
        """The HF dataset repo of one split's shards, or None for local files."""
        _check_split(split)
        return self.train_repo_id if split == "train" else self.repo_id

    def keys(self, split: Split) -> tuple[str, ...]:
        """Label keys tried in order for one split."""
        _check_split(split)
        return self.train_keys if split == "train" else self.eval_keys

    @property
    def trained(self) -> bool:
        return bool(self.train_shards)

    @property
    def scored(self) -> bool:
        return self.metric is not None and bool(self.test_shards)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TrackSpec:
    """The tasks of one decoder plus the training fields of XARES-LLM's train YAML."""

    name: str  # "A", "A-hidden", "B", "B-hidden", "demo-a", "demo-b" or "custom"
    tasks: tuple[TaskSpec, ...]
    decoder_track: str  # the track whose decoder scores these tasks ("B" for "B-hidden")
    # training (top-level fields of the train YAML; XARES-LLM defaults when omitted)
    max_steps: int = 10000
    learning_rate: float = 1e-4
    warmup_steps: int = 200
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    per_device_train_batch_size: int = 4
    seed: int = 42
    crop_audio_length: float = 30.0  # seconds; longer training clips are cropped
    decoder_model_name: str = DEFAULT_DECODER
    optimizer: str = "adamw_torch"
    save_steps: int = 200
    save_total_limit: int | None = 1
    extra: dict[str, Any] = field(default_factory=dict, hash=False)  # other top-level fields, verbatim
    sources: tuple[str, ...] = ()  # the YAML files this track was read from

    def task(self, task_id: str) -> TaskSpec:
        """The task with this id.

        Raises:
            KeyError: no such task (the message lists the ids there are).
        """
        for t in self.tasks:
            if t.id == task_id:
                return t
        raise KeyError(f"track {self.name} has no task {task_id!r}; it has: {', '.join(self.ids)}")

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(t.id for t in self.tasks)

    @property
    def train_tasks(self) -> tuple[TaskSpec, ...]:
        return tuple(t for t in self.tasks if t.trained)

    @property
    def eval_tasks(self) -> tuple[TaskSpec, ...]:
        return tuple(t for t in self.tasks if t.scored)

    def mixture(self) -> dict[str, float]:
        """Training sampling probabilities per task id, summing to 1.

        As in XARES-LLM: a task's ``prob`` when given, otherwise its share of the track's train shard
        files (brace-expanded names; a glob counts once); then normalised over the train tasks.
        """
        tasks = self.train_tasks
        if not tasks:
            return {}
        counts = {t.id: sum(len(expand_braces(p)) for p in t.train_shards) for t in tasks}
        total_shards = sum(counts.values())
        raw = {t.id: (t.prob if t.prob is not None else counts[t.id] / total_shards) for t in tasks}
        norm = sum(raw.values())
        if norm <= 0:
            return {k: 1.0 / len(raw) for k in raw}
        return {k: v / norm for k, v in raw.items()}

    def training_fields(self) -> dict[str, Any]:
        """The train-YAML top-level fields (known ones plus ``extra``), e.g. to store in a checkpoint."""
        d = {k: v for k, v in asdict(self).items() if k not in ("name", "tasks", "decoder_track", "extra", "sources")}
        d.update(self.extra)
        return d

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
