"""Evaluate one submission on one track: verify → extract (sandbox) → train → generate → score.

    xares-eval run submission.tar --track demo-a --out out/

Every stage leaves its output on disk under a folder named by a hash of everything that shapes it,
so a rerun after a kill resumes where it stopped and a changed setting never reuses an old result:

    out/
      features/<store key>/                    feature stores, shared by runs and submissions
      <encoder>-<sha12>/
        train-<decoder track>-<train key12>/   checkpoints, trainable.safetensors, train.json
        <track>-<run key12>/                   config.json, probe.json, predictions/<task>.jsonl,
                                               results.json, scores.tsv, run.log
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import platform
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

from evaluator.data import (
    SkipReport,
    TaskSpec,
    TrackSpec,
    choose_prompt,
    clips_by_key,
    get_track,
    iter_clips,
    prompt_draw,
    shard_digests,
)
from evaluator.data.reference_order import EvalSample, reference_eval_order
from evaluator.errors import DataError, SubmissionError, XaresError, first_line
from evaluator.extraction import ExtractionConfig, extract, sample_keys, spot_check
from evaluator.features import FeatureRangeError, FeatureStore, StoreKey
from evaluator.fileio import DigestCache, atomic_write_text
from evaluator.progress import progress as progress_of
from evaluator.progress import waiting
from evaluator.sandbox import Limits, open_runtime
from evaluator.sandbox.base import TimeBudget
from evaluator.submission.archive import unpacked
from evaluator.submission.manifest import Manifest
from evaluator.submission.probe import ProbeConfig, ProbeReport, run_probe

logger = logging.getLogger(__name__)

RUN_FORMAT = 3  # bump when the layout or the meaning of a stage's output changes (3: XARES-LLM's samples and order)
PREDICTIONS_DIR = "predictions"
DIGEST_CACHE = ".cache/sha256.json"  # under --out: digests of decoder files by (path, size, mtime)
SPOT_CHECK_MIN_CLIPS = 4  # re-extract at least this many clips, however small the share
LOSS_POINTS = 500  # points of the loss curve kept in train.json
EXTRACTION_FIELDS = ("clips", "failed", "audio_seconds", "wall_seconds", "runtime", "device", "finished")
TEXT_POSITIONS = 256  # --pack auto sizes packs for the longest audio plus this many prompt and answer tokens


@dataclass(frozen=True)
class RunOptions:
    """How to run; the fields that change a result are hashed into the output folders' names."""

    out: Path = Path("out")
    decoder: str | None = None  # name or path; None: the track's decoder_model_name (SmolLM2-135M)
    max_steps: int | None = None  # None: the track's max_steps
    precision: str = "fp32"  # fp32 (deterministic, the protocol) | bf16 (fast mode)
    device: str = "auto"  # where the decoder trains and generates: auto | cpu | cuda | cuda:N
    compile: str = "auto"  # graph capture of the decoder: auto (on CUDA) | on | off; never changes the keys
    seed: int | None = None  # None: the track's seed (42)
    machine: str = field(default_factory=platform.node)  # recorded in results.json
    feature_dtype: str = "auto"  # storage dtype of the features; auto: float16 when the probe's range fits, else float32
    store_root: Path | None = None  # None: <out>/features
    memory_mb: int | None = None  # encoder memory cap; None: the manifest's resources.memory_mb
    gpu: bool = False  # give the encoder a GPU (fails with a message when none is usable)
    spot_check: float = 0.02  # share of one eval task's clips re-extracted and compared (0: off)
    data_home: Path | None = None
    hidden_config: Path | None = None
    download: bool = True  # fetch missing HF shards (never with HF_HUB_OFFLINE=1)
    threads: int | None = None  # torch CPU threads; None: the cores this process may use (affinity, cgroup)
    eval_batch_size: int | None = None  # None: the engine's default (32 on a CPU, 256 on a GPU); answers do not depend on it
    max_new_tokens: int = 150
    checkpoint_every: int = 500  # training steps between checkpoints
    limit_clips: int | None = None  # at most this many clips per task split (smoke runs); keyed
    time_budget: TimeBudget = TimeBudget()  # wall clock of the probe and of each extraction (recorded)
    progress: bool = True
    sign_key: Path | None = None  # the organizer's private key: results.json gets a signed receipt.json


@dataclass(frozen=True)
class RunOutcome:
    run_dir: Path
    results_path: Path
    document: dict


Echo = Callable[[str], None]
Predict = Callable[[TaskSpec, object], list]  # (task, its test FeatureDataset) -> Predictions, in dataset order


def run_submission(archive: Path, track: TrackSpec, opts: RunOptions, *, echo: Echo = print,
                   train_track: TrackSpec | None = None) -> RunOutcome:
    """Evaluate ``archive`` on ``track`` and write results.json.

    Args:
        archive: the submission.tar.
        track: the evaluated tasks (``track.eval_tasks``).
        opts: run options.
        echo: where step lines go (the CLI passes click.echo).
        train_track: the tasks the decoder is trained on; default ``track`` itself, or the track named
            by ``track.decoder_track`` when that differs (B-hidden is scored with Track B's decoder).

    Returns:
        The run folder, the results file and the results document.

    Raises:
        SubmissionError: the submission is invalid or its encoder misbehaves (nothing is scored).
        DataError: the training data is missing or unusable.
        ModelError: the decoder or a metric model is missing.
    """
    train_track = _checked_tracks(track, train_track, opts)
    return _run_solo(_prepare(Path(archive), track, train_track, opts, echo))


def prepare_submission(archive: Path, track: TrackSpec, opts: RunOptions, *, echo: Echo = print,
                       train_track: TrackSpec | None = None) -> Path:
    """Check ``archive`` and store its features for ``track`` (a campaign's first stage); returns its folder.

    The later stages (`run_submissions` with ``score`` off, then `run_submission`) find the probe, the
    spot check and the features recorded and start the encoder no more.

    Raises:
        SubmissionError, DataError, ModelError: as `run_submission`.
    """
    train_track = _checked_tracks(track, train_track, opts)
    return _prepare(Path(archive), track, train_track, opts, echo).sub_dir


def _run_solo(prep: _Prepared, *, score: bool = True) -> RunOutcome | None:
    """Train the submission's decoder alone, then (unless ``score`` is off) generate and score."""
    from evaluator.generation import Generator
    from evaluator.model import build_model
    from evaluator.training import train

    plan, opts = prep.plan, prep.stages.opts
    prep.stages.echo(f"Training the decoder for track {prep.train_track.name}: {plan.model_cfg.decoder}, "
                     f"{plan.train_cfg.max_steps} steps, {plan.train_cfg.precision} -> {plan.train_dir}")
    model = build_model(plan.model_cfg, seed=plan.train_cfg.seed)
    result = train(model, plan.datasets, plan.probs, plan.train_cfg, plan.train_dir, progress=opts.progress)
    prep.stages.report_training(plan, result)
    if not score:
        return None
    options = prep.stages.decoding_options()
    with _OnFirstUse(lambda: Generator(model, options)) as generator:  # one merge of LoRA per run
        return _finish(prep, lambda task, dataset: generator.get().generate(dataset, progress=opts.progress), model)


@dataclass(frozen=True)
class BatchOutcome:
    """One submission of `run_submissions`: its outcome, or why it failed."""

    archive: Path
    outcome: RunOutcome | None = None
    error: XaresError | None = None


def run_submissions(archives: list[Path], track: TrackSpec, opts: RunOptions, *, pack: int | None = None,
                    echo: Echo = print, train_track: TrackSpec | None = None,
                    score: bool = True) -> list[BatchOutcome]:
    """Evaluate several submissions on ``track``, training (and decoding with) their decoders in packs.

    Each submission is checked and its features extracted in turn; then the decoders that can share the
    frozen decoder (same decoder, precision, device, batch size) are trained together, ``pack`` at a time
    (None: as many as fit the device's memory; 1: each alone, as `run_submission`), and decode their test
    sets together. Folders, keys and
    results are those of separate `run_submission` calls: either reuses the other's finished work. A
    submission that fails (invalid, a broken encoder, bad data, a non-finite loss) is reported; the
    others go on. With ``score`` off it stops after training (a campaign's train stage): the outcomes
    of the trained submissions are then empty.
    """
    train_track = _checked_tracks(track, train_track, opts)
    done: dict[int, BatchOutcome] = {}
    prepared: list[tuple[int, _Prepared]] = []
    first_of: dict[Path, int] = {}  # the same file twice is evaluated once
    for i, archive in enumerate(map(Path, archives)):
        if archive.resolve() in first_of:
            continue
        first_of[archive.resolve()] = i
        try:
            prepared.append((i, _prepare(archive, track, train_track, opts, echo)))
        except XaresError as e:
            done[i] = BatchOutcome(archive, error=e)
            echo(f"  - {archive.name}: FAILED: {first_line(e)}")
    groups: dict[str, list[tuple[int, _Prepared]]] = {}
    seen: dict[str, int] = {}  # two files with the same submission inside share one decoder
    for i, prep in prepared:
        if prep.sub_sha in seen:
            first_of[prep.archive.resolve()] = seen[prep.sub_sha]
            continue
        seen[prep.sub_sha] = i
        groups.setdefault(prep.plan.pack_key, []).append((i, prep))
    for members in groups.values():
        try:
            _run_group(members, pack, train_track, opts, echo, done, score)
        except XaresError as e:  # the shared decoder itself: every member not finished yet fails
            for i, prep in members:
                done.setdefault(i, BatchOutcome(prep.archive, error=e))
            echo(f"  - {len(members)} submission(s) sharing the decoder: FAILED: {first_line(e)}")
    outcomes = []
    for i, archive in enumerate(map(Path, archives)):
        same = done.get(i) or done[first_of[archive.resolve()]]
        outcomes.append(BatchOutcome(archive, outcome=same.outcome, error=same.error))
    return outcomes


def _run_group(members: list[tuple[int, _Prepared]], pack: int | None, train_track: TrackSpec, opts: RunOptions,
               echo: Echo, done: dict[int, BatchOutcome], score: bool) -> None:
    """The submissions that can share one decoder: sized (--pack auto) and trained over one loaded pack."""
    from evaluator.pack import DecoderPack

    with _OnFirstUse(lambda: _closing(DecoderPack(members[0][1].plan.model_cfg))) as shared:
        size = pack or _auto_pack_size(shared.get(), [p for _, p in members], echo)
        if size == 1:  # one at a time: each exactly as `run_submission` alone
            for i, prep in members:
                try:
                    done[i] = BatchOutcome(prep.archive, outcome=_run_solo(prep, score=score))
                except XaresError as e:
                    done[i] = BatchOutcome(prep.archive, error=e)
                    echo(f"  - {prep.label}: FAILED: {first_line(e)}")
            return
        for start in range(0, len(members), size):
            done.update(_run_pack(members[start : start + size], shared.get(), train_track, opts, echo, score))


@contextlib.contextmanager
def _closing(pack):
    try:
        yield pack
    finally:
        pack.close()


def _run_pack(chunk: list[tuple[int, _Prepared]], pack, train_track: TrackSpec, opts: RunOptions,
              echo: Echo, score: bool = True) -> dict[int, BatchOutcome]:
    """Train the chunk's decoders together over ``pack``'s decoder, then decode and score them."""
    from evaluator.generation import PackedGenerator
    from evaluator.training import PackedJob, train_packed

    first = chunk[0][1].plan
    names = ", ".join(prep.label for _, prep in chunk)
    together = f"{len(chunk)} decoders together" if len(chunk) > 1 else "1 decoder (a pack of one)"
    echo(f"Training {together} for track {train_track.name}: "
         f"{first.model_cfg.decoder}, {first.train_cfg.max_steps} steps, {first.train_cfg.precision} ({names})")
    outcomes: dict[int, BatchOutcome] = {}
    jobs = {i: pack.add_job(prep.plan.model_cfg, seed=prep.plan.train_cfg.seed) for i, prep in chunk}
    trained = train_packed(pack, [PackedJob(prep.label, jobs[i], prep.plan.datasets, prep.plan.probs,
                                            prep.plan.train_cfg, prep.plan.train_dir) for i, prep in chunk],
                           progress=opts.progress)
    live = []
    for (i, prep), result in zip(chunk, trained):
        if result.error is not None:
            outcomes[i] = BatchOutcome(prep.archive, error=result.error)
            echo(f"  - {prep.label}: FAILED: {first_line(result.error)}")
            continue
        prep.stages.report_training(prep.plan, result.result, prefix=f"{prep.label}: ")
        live.append((i, prep))
    if not score:
        return {**outcomes, **{i: BatchOutcome(prep.archive) for i, prep in live}}
    if not live:
        return outcomes
    options = chunk[0][1].stages.decoding_options()
    predictions = _PackedPredictions([prep for _, prep in live], opts)
    with _OnFirstUse(lambda: PackedGenerator(pack, [jobs[i] for i, _ in live], options)) as generator:
        predictions.generator = generator
        for k, (i, prep) in enumerate(live):
            try:
                outcomes[i] = BatchOutcome(prep.archive, outcome=_finish(prep, partial(predictions.get, k), jobs[i]))
            except XaresError as e:
                outcomes[i] = BatchOutcome(prep.archive, error=e)
                echo(f"  - {prep.label}: FAILED: {first_line(e)}")
    return outcomes


class _PackedPredictions:
    """Decodes a task for every job of a pack the first time one of them asks for it.

    A job whose test features break decoding (a bad shape, NaN) would stop the shared batches: the task
    is then decoded job by job, so only that job's task fails.
    """

    def __init__(self, preps: list[_Prepared], opts: RunOptions):
        self.preps, self.opts = preps, opts
        self.generator: _OnFirstUse | None = None
        self._done: dict[tuple[int, str], list | XaresError] = {}

    def get(self, k: int, task: TaskSpec, dataset) -> list:
        if (k, task.id) not in self._done:
            self._decode(task)
        value = self._done.pop((k, task.id))
        if isinstance(value, XaresError):
            raise value
        return value

    def _decode(self, task: TaskSpec) -> None:
        wanted = [prep.needs_predictions(task) for prep in self.preps]
        datasets = [prep.eval_stores[task.id].dataset(prompt=task.prompt, task=task.id) if want else None
                    for prep, want in zip(self.preps, wanted)]
        datasets = [ds if ds is not None and len(ds) else None for ds in datasets]
        gen = self.generator.get()
        try:
            results = gen.generate_many(datasets, progress=self.opts.progress)
        except DataError:
            results = []
            for k, ds in enumerate(datasets):
                try:
                    results.append(gen.generate_many([ds if j == k else None for j in range(len(datasets))],
                                                     progress=self.opts.progress)[k])
                except DataError as e:
                    results.append(e)
        for k, value in enumerate(results):
            if wanted[k]:
                self._done[k, task.id] = [] if value is None else value


def resolve_track(name: str | None, *, train_config: Path | None = None, eval_config: Path | None = None,
                  data_home: Path | None = None, hidden_config: Path | None = None) -> TrackSpec:
    """A named track, or a custom one from XARES-LLM YAML files (``--train-config/--eval-config``)."""
    from evaluator.data import load_xares_yaml

    if train_config or eval_config:
        return load_xares_yaml(train_config, eval_config, track=name or "custom")
    return get_track(name, hidden_config=hidden_config, data_home=data_home)


def _device(opts: RunOptions) -> tuple[str, str]:
    """The decoder's device, checked now: its name ('cuda:0') and description ('cuda:0 (NVIDIA H200)')."""
    from evaluator import compute

    device = compute.resolve_device(opts.device)
    return str(device), compute.describe(device)


def _decoder_track(track: TrackSpec, opts: RunOptions) -> TrackSpec:
    if track.decoder_track == track.name or track.train_tasks:
        return track
    return get_track(track.decoder_track, hidden_config=opts.hidden_config, data_home=opts.data_home)


def _checked_tracks(track: TrackSpec, train_track: TrackSpec | None, opts: RunOptions) -> TrackSpec:
    train_track = train_track or _decoder_track(track, opts)
    if not track.eval_tasks:
        raise DataError(f"track {track.name} has no evaluation task (no test shards with a metric)")
    if not train_track.train_tasks:
        raise DataError(f"track {train_track.name} has no training task to train its decoder on")
    return train_track


@dataclass
class _TrainPlan:
    """Everything that trains one submission's decoder, decided before any training starts."""

    model_cfg: object  # ModelConfig
    train_cfg: object  # TrainConfig
    key: str
    train_dir: Path
    datasets: list
    probs: list[float]
    pack_key: str  # plans with equal keys can share a pack's decoder
    decoder_id: dict  # what the decoder is (a hub name, or a folder's file digests): keyed, and signed
    longest: int  # positions of the longest training row it can draw (audio frames + text), for --pack auto


@dataclass
class _Prepared:
    """A submission checked and its features stored: what its decoder and its scoring need."""

    archive: Path
    manifest: Manifest
    sub_sha: str
    sub_dir: Path
    probe: ProbeReport
    stages: _Stages
    track: TrackSpec
    train_track: TrackSpec
    eval_stores: dict[str, FeatureStore]
    described: str
    plan: _TrainPlan

    @property
    def label(self) -> str:  # unique among submissions: two teams may pick the same name
        return self.sub_dir.name

    @property
    def run_key(self) -> str:
        return _digest({
            "format": RUN_FORMAT, "train": self.plan.train_dir.name, "track": self.track.name,
            "tasks": [_task_identity(t, self.eval_stores.get(t.id)) for t in self.track.eval_tasks],
            "decoding": {"max_new_tokens": self.stages.opts.max_new_tokens, "batch": self.stages.opts.eval_batch_size},
        })

    @property
    def run_dir(self) -> Path:
        return self.sub_dir / f"{self.track.name}-{self.run_key[:12]}"

    def needs_predictions(self, task: TaskSpec) -> bool:
        return (task.id in self.eval_stores and task.id not in self.stages.errors
                and not (self.run_dir / PREDICTIONS_DIR / f"{task.id}.jsonl").exists())


def _prepare(archive: Path, track: TrackSpec, train_track: TrackSpec, opts: RunOptions, echo: Echo) -> _Prepared:
    """Check the submission, run its probe, extract and spot-check its features, plan its decoder."""
    echo = _Transcript(echo)  # the run's lines, for its run.log
    echo(f"Checking {archive.name}")
    with unpacked(archive) as sub:
        root, manifest, sub_sha = sub.root, sub.manifest, sub.sha256
        echo(f"  - {manifest.name} ({manifest.team}): {manifest.kind}, D = {manifest.output_dim}, "
             f"{manifest.describe_frames()}, sha256 {sub_sha[:12]}")
        # fail now, not after hours of extraction: the decoder must be there and the device usable
        from evaluator.hub import check_decoder

        device, described = _device(opts)
        check_decoder(opts.decoder or train_track.decoder_model_name)
        echo(f"  - decoder on {described}")
        sub_dir = Path(opts.out) / f"{manifest.name}-{sub_sha[:12]}"
        limits = Limits(memory_mb=opts.memory_mb or manifest.resources.memory_mb, gpu=opts.gpu)
        with _OnFirstUse(lambda: open_runtime(root, manifest, limits)) as sandbox:
            probe = _probe(archive, sandbox, manifest, sub_sha, sub_dir, limits, opts, echo)
            if probe.batching != "padded":
                echo(f"  - padding changes this encoder's frames ({probe.padding_cause}): clips are encoded "
                     + ("in batches of equal length" if probe.batching == "equal_length" else "one at a time"))
            stages = _Stages(sub_sha, manifest, opts, sandbox, echo, device, probe)
            if train_track.name != track.name:
                echo(f"  - {track.name} is scored with the decoder of track {train_track.name}, trained on its data")
            train_stores = stages.extract_split(train_track.train_tasks, "train", required=True)
            eval_stores = stages.extract_split(track.eval_tasks, "test", required=False)
            stages.spot_check(track.eval_tasks, eval_stores, sub_dir)
    plan = stages.plan_training(train_track, train_stores, sub_dir)
    return _Prepared(archive, manifest, sub_sha, sub_dir, probe, stages, track, train_track, eval_stores, described,
                     plan)


def _probe(archive: Path, sandbox: _OnFirstUse, manifest: Manifest, sub_sha: str, sub_dir: Path, limits: Limits,
           opts: RunOptions, echo: Echo) -> ProbeReport:
    """The probe's report: run now, or the one this submission passed before under the same settings
    (recorded in its folder, so the later stages of a campaign never start the encoder for it)."""
    config = ProbeConfig(time_budget=opts.time_budget)
    key = _digest({"format": RUN_FORMAT, "submission": sub_sha, "probe": asdict(config), "limits": asdict(limits)})
    path = sub_dir / f"probe-{key[:12]}.json"
    with contextlib.suppress(FileNotFoundError, ValueError, KeyError, TypeError):
        probe = ProbeReport.from_dict(json.loads(path.read_text()))
        if probe.ok:
            echo(f"  - probe: {len(probe.checks)} checks passed before ({path.name})")
            return probe
    probe = run_probe(sandbox.get(), manifest, config)
    if not probe.ok:
        raise SubmissionError(f"{archive.name} fails {len(probe.reasons)} probe check(s)", reasons=probe.reasons)
    echo(f"  - probe: {len(probe.checks)} checks passed on {sandbox.get().device} ({sandbox.get().isolation})")
    _write_json(path, probe.to_dict())
    return probe


def _finish(prep: _Prepared, predict: Predict, codec) -> RunOutcome:
    """Generate (through ``predict``), score and write results.json in the submission's run folder."""
    run_key, run_dir, manifest, stages, track = prep.run_key, prep.run_dir, prep.manifest, prep.stages, prep.track
    opts = stages.opts
    run_dir.mkdir(parents=True, exist_ok=True)
    config = _jsonable({
        "run_key": run_key, "submission": {"name": manifest.name, "sha256": prep.sub_sha},
        "track": track.name, "train_dir": str(prep.plan.train_dir), "device": prep.described,
        "options": asdict(opts),
        "skipped": {k: v for k, v in stages.skips.items()},
        "tasks": {t.id: {"metric": t.metric, "metric_args": t.metric_args, "hidden": t.hidden}
                  for t in track.eval_tasks},
        "extraction": {k: {f: store.profile.get(f) for f in EXTRACTION_FIELDS} for k, store in sorted(stages.stores.items())},
    })
    transcript = stages.echo if isinstance(stages.echo, _Transcript) else _Transcript(stages.echo)
    try:
        with _log_to(transcript):
            _write_json(run_dir / "probe.json", prep.probe.to_dict())
            _write_json(run_dir / "config.json", config)
            results = stages.evaluate(track, prep.eval_stores, run_dir, predict, codec)
    finally:  # the whole run, up to where it stopped
        atomic_write_text(run_dir / "run.log", "\n".join(transcript.lines) + "\n")
    from evaluator import __version__
    from evaluator.scoring import results_document

    document = results_document(
        submission=manifest.name, sha256=prep.sub_sha, machine=opts.machine, track=track.name, tasks=results,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), evaluator_version=__version__,
        run_key=run_key, config={"train_dir": prep.plan.train_dir.name, "decoder": prep.plan.model_cfg.decoder,
                                 "max_steps": prep.plan.train_cfg.max_steps, "precision": opts.precision,
                                 "device": prep.described},
    )
    results_path = run_dir / "results.json"
    _write_json(results_path, document)
    _write_scores_tsv(run_dir / "scores.tsv", document)
    if opts.sign_key is not None:
        _sign(prep, document, config, run_dir)
    return RunOutcome(run_dir=run_dir, results_path=results_path, document=document)


def _sign(prep: _Prepared, document: dict, config: dict, run_dir: Path) -> None:
    """receipt.json beside results.json: the organizer's signature over the scores and all that made them."""
    from evaluator import __version__
    from evaluator.receipts import RECEIPT_FILE, load_private_key, receipt_payload, sign, write_receipt

    manifest, opts = prep.manifest, prep.stages.opts
    if manifest.onnx is not None:
        model = next((f.sha256 for f in manifest.files if f.path == manifest.onnx.model), None)
    else:
        model = manifest.container.image_id if manifest.container is not None else None
    payload = receipt_payload(
        document, submission_sha256=prep.sub_sha, model_digest=model,
        # each store's name is the digest of its shards' sha256s and the extraction settings
        data_digests={k: store.path.name for k, store in sorted(prep.stages.stores.items())},
        decoder=prep.plan.decoder_id, config=config, evaluator_version=__version__)
    write_receipt(run_dir / RECEIPT_FILE, sign(payload, load_private_key(Path(opts.sign_key))))


def _auto_pack_size(pack, preps: list[_Prepared], echo: Echo) -> int:
    """As many jobs as the device's free memory holds at the longest batch these jobs can draw."""
    from evaluator.compute import resolve_device
    from evaluator.pack import capacity, free_memory

    plan = preps[0].plan
    device = resolve_device(plan.train_cfg.device)
    widest = max(preps, key=lambda p: p.plan.model_cfg.encoder_dim).plan
    length = max(p.plan.longest for p in preps)
    job = pack.to(device).add_job(widest.model_cfg, seed=0)
    size = capacity(pack, job, plan.train_cfg.batch_size, length, free_bytes=free_memory(device))
    echo(f"  - --pack auto: {size} decoder{'s' if size > 1 else ''} per pack on {device} "
         f"(batches of up to {length} positions)")
    if device.type == "cpu" and size > 1:
        echo("    (on a CPU a pack is no faster than separate runs, measured in docs/benchmarks.md: the cores "
             "have no idle time for it to fill; --pack 1 runs them one after another)")
    return size


class _OnFirstUse:
    """A context (the encoder runtime, the generation engine) entered only when first asked for, and left
    with this one: a run whose features or predictions are all cached never starts it."""

    def __init__(self, opener: Callable[[], contextlib.AbstractContextManager]):
        self._opener = opener
        self._stack = contextlib.ExitStack()
        self._value = None

    def get(self):
        if self._value is None:
            self._value = self._stack.enter_context(self._opener())
        return self._value

    def __enter__(self) -> _OnFirstUse:
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()


class _Stages:
    """The stages of one run, sharing the submission, the options and the sandbox."""

    def __init__(self, sub_sha: str, manifest: Manifest, opts: RunOptions, sandbox: _OnFirstUse, echo: Echo,
                 device: str, probe: ProbeReport):
        self.sub_sha, self.manifest, self.opts, self.sandbox, self.echo = sub_sha, manifest, opts, sandbox, echo
        self.device = device  # "cpu" | "cuda:N"
        # what the organizer's own probe measured decides how this encoder is run and stored
        self.extraction = ExtractionConfig(batching=probe.batching, fixed_frames=probe.fixed_frames,
                                           time_budget=opts.time_budget)
        self.feature_dtype = probe.feature_dtype if opts.feature_dtype == "auto" else opts.feature_dtype
        self.store_root = opts.store_root or Path(opts.out) / "features"
        self.skips: dict[str, dict] = {}  # "<task>/<split>" -> skip counts
        self.stores: dict[str, FeatureStore] = {}  # "<task>/<split>" -> its store (the report shows their profiles)
        self.errors: dict[str, str] = {}  # eval task id -> why it could not be extracted

    # ---- features --------------------------------------------------------------------------------
    def extract_split(self, tasks: tuple[TaskSpec, ...], split: str, *, required: bool) -> dict[str, FeatureStore]:
        self.echo(f"Extracting features ({split}: {len(tasks)} task{'s' if len(tasks) != 1 else ''})")
        stores = {}
        for task in tasks:
            try:
                stores[task.id] = self._extract_task(task, split)
            except SubmissionError:
                raise  # the encoder broke the contract: nothing of this submission is scored
            except XaresError as e:
                if required:
                    raise
                self.errors[task.id] = str(e)
                self.echo(f"  - {task.id}: FAILED: {e}")
        return stores

    def _extract_task(self, task: TaskSpec, split: str) -> FeatureStore:
        digests = shard_digests(task, split, data_home=self.opts.data_home, download=self.opts.download)
        settings = [("label_keys", ";".join(task.keys(split)))]
        if self.opts.limit_clips:
            settings.append(("limit", str(self.opts.limit_clips)))
        if self.extraction.batching != "padded":  # unpadded encoding gives other features for such encoders
            settings.append(("batching", self.extraction.batching))
        key = StoreKey.for_shards(self.sub_sha, digests, task=task.id, split=split, dtype=self.feature_dtype,
                                  window_seconds=self.manifest.max_audio_seconds, settings=tuple(settings))
        try:
            store = self._fill(task, split, key)
        except FeatureRangeError as e:
            if self.opts.feature_dtype != "auto":
                raise
            # louder data than the probe's: never fail a valid submission on range, store float32 instead
            self.echo(f"  - {task.id}: {e}; storing this split as float32")
            FeatureStore.open(self.store_root, key).clear()
            store = self._fill(task, split, replace(key, dtype="float32"))
        self.stores[f"{task.id}/{split}"] = store
        return store

    def _fill(self, task: TaskSpec, split: str, key: StoreKey) -> FeatureStore:
        store = FeatureStore.open(self.store_root, key)
        skips = SkipReport(task=task.id, split=split)
        if store.complete:
            self.echo(f"  - {task.id}: reused {len(store.entries)} clips, 0 encoder calls")
            return store
        clips = iter_clips(task, split, data_home=self.opts.data_home, report=skips,
                           download=self.opts.download, limit=self.opts.limit_clips)
        with progress_of(f"extracting {task.id} ({split})", unit="clips", enabled=self.opts.progress) as bar:
            report = extract(self.sandbox.get(), clips, store, self.manifest, self.extraction,
                             progress=lambda done, seconds: bar.set(done, f"{seconds:.0f} audio-s"))
        self.skips[f"{task.id}/{split}"] = {"clips": skips.clips, "skipped": skips.skipped,
                                             "reasons": dict(skips.counts)}
        dropped = [f"{n} {reason}" for reason, n in sorted(skips.counts.items()) if n]
        note = f" (skipped: {', '.join(dropped)})" if dropped else ""
        self.echo(f"  - {task.id}: {report.summary()}{note}")
        for line in skips.lines()[1:]:
            logger.warning("%s/%s: %s", task.id, split, line.strip())
        return store

    def spot_check(self, tasks: tuple[TaskSpec, ...], stores: dict[str, FeatureStore], sub_dir: Path) -> None:
        """Re-extract a seeded sample of one eval task and compare it with the stored features (once per
        set of stores: a passed check is recorded in the submission's folder)."""
        candidates = [t for t in tasks if t.id in stores and stores[t.id].entries]
        if self.opts.spot_check <= 0 or not candidates:
            return
        key = _digest({"share": self.opts.spot_check, "stores": sorted(s.path.name for s in stores.values())})
        record = sub_dir / f"spot-check-{key[:12]}.json"
        if record.exists():
            self.echo(f"  - spot check passed before ({record.name})")
            return
        rng = random.Random(f"{self.sub_sha}:{len(candidates)}")
        task = rng.choice(candidates)
        store = stores[task.id]
        n = min(len(store.entries), max(SPOT_CHECK_MIN_CLIPS, round(self.opts.spot_check * len(store.entries))))
        wanted = set(sample_keys(store, n=n, seed=rng.randrange(2**31)))
        clips = clips_by_key(task, "test", wanted, data_home=self.opts.data_home)
        report = spot_check(self.sandbox.get(), clips, store, self.manifest, config=self.extraction)
        self.echo(f"  - spot check on {task.id}: {len(report.checked)} clips re-extracted, "
                  f"max |diff| {report.max_abs_diff:.3g}: ok")
        _write_json(record, {"task": task.id, "checked": list(report.checked), "max_abs_diff": report.max_abs_diff})

    # ---- decoder ---------------------------------------------------------------------------------
    def decoder_name(self, track: TrackSpec) -> str:
        """A hub name as given; a local folder by its real path, so that however it is named (demo_out/dec,
        ./demo_out/dec, /abs/demo_out/dec) it is one decoder with one key, and its checkpoints resume."""
        name = self.opts.decoder or track.decoder_model_name
        folder = Path(name).expanduser()
        return str(folder.resolve()) if folder.is_dir() else name

    def max_steps(self, track: TrackSpec) -> int:
        return self.opts.max_steps if self.opts.max_steps is not None else track.max_steps

    def _crop(self, track: TrackSpec) -> tuple[int | None, int, float | None]:
        """(crop_frames, crop_align, crop_seconds) for training: crop_audio_length seconds of frames. A
        fixed-frame encoder saw the audio in equal windows of at most max_audio_seconds, each giving the
        same count: whole windows, as many per clip as come closest to crop_audio_length of its audio."""
        if not track.crop_audio_length:
            return None, 1, None
        if self.manifest.fixed_frames:
            per_window = self.extraction.fixed_frames or 1
            windows = max(1, int(track.crop_audio_length // self.manifest.max_audio_seconds))
            return windows * per_window, per_window, track.crop_audio_length
        return max(1, round(track.crop_audio_length * self.manifest.frames_per_second)), 1, None

    def plan_training(self, track: TrackSpec, stores: dict[str, FeatureStore], sub_dir: Path) -> _TrainPlan:
        from evaluator.model import ModelConfig
        from evaluator.pack import shared_part
        from evaluator.training import SHARED_SETTINGS, TrainConfig

        decoder = self.decoder_name(track)
        model_cfg = ModelConfig(encoder_dim=self.manifest.output_dim, decoder=decoder,
                                dtype="bfloat16" if self.opts.precision == "bf16" else "float32")
        crop = self._crop(track)
        train_cfg = TrainConfig(
            max_steps=self.max_steps(track), learning_rate=track.learning_rate, warmup_steps=track.warmup_steps,
            weight_decay=track.weight_decay, max_grad_norm=track.max_grad_norm,
            batch_size=track.per_device_train_batch_size,
            seed=self.opts.seed if self.opts.seed is not None else track.seed,
            crop_frames=crop[0], crop_align=crop[1], crop_seconds=crop[2],
            precision=self.opts.precision, threads=self.opts.threads, device=self.device, compile=self.opts.compile,
            checkpoint_every=min(self.opts.checkpoint_every, self.max_steps(track)),
        )
        mixture = track.mixture()
        tasks = track.train_tasks
        decoder_id = _decoder_identity(decoder, DigestCache(Path(self.opts.out) / DIGEST_CACHE))
        key = _digest({
            "format": RUN_FORMAT, "submission": self.sub_sha, "model": model_cfg.to_dict(), "decoder": decoder_id,
            "train": train_cfg.identity(),
            "tasks": [{**_task_identity(t, stores[t.id]), "prob": mixture[t.id]} for t in tasks],
        })
        pack_key = _digest({"model": shared_part(model_cfg).to_dict(), "decoder": decoder_id,
                            "shared": {k: getattr(train_cfg, k) for k in SHARED_SETTINGS}})
        frames = max((e.frames for t in tasks for e in stores[t.id].entries.values()), default=1)
        plan = _TrainPlan(model_cfg=model_cfg, train_cfg=train_cfg, key=key,
                          train_dir=sub_dir / f"train-{track.name}-{key[:12]}",
                          datasets=[stores[t.id].dataset(prompt=t.prompt_for_training, task=t.id) for t in tasks],
                          probs=[mixture[t.id] for t in tasks], pack_key=pack_key, decoder_id=decoder_id,
                          longest=min(frames, crop[0] or frames) + TEXT_POSITIONS)
        return plan

    def report_training(self, plan: _TrainPlan, result, prefix: str = "") -> None:
        if result.resumed_from == plan.train_cfg.max_steps:
            self.echo(f"  - {prefix}reused the finished checkpoint")
        elif result.resumed_from:
            self.echo(f"  - {prefix}resumed from step {result.resumed_from}")
        tail = result.losses[-min(50, len(result.losses)):]
        if tail:
            self.echo(f"  - {prefix}final loss {sum(tail) / len(tail):.3f} ({result.seconds:.0f} s)")
        path = plan.train_dir / "train.json"
        seconds = result.seconds
        if result.resumed_from and path.exists():  # the time of the training, not of this call only
            with contextlib.suppress(ValueError, TypeError):
                seconds += float(json.loads(path.read_text()).get("seconds") or 0.0)
        _write_json(path, {"key": plan.key, "model": plan.model_cfg.to_dict(), "device": self.device,
                           "train": plan.train_cfg.identity(), "steps": result.steps, "seconds": round(seconds, 1),
                           "loss_curve": loss_curve(result.losses)})

    # ---- generation and scoring ------------------------------------------------------------------
    def evaluate(self, track: TrackSpec, stores: dict[str, FeatureStore], run_dir: Path, predict: Predict,
                 codec) -> list:
        """Predictions (cached on disk, else from ``predict``) and the score of every eval task."""
        from evaluator.scoring import TaskResult

        self.echo(f"Generating and scoring {self.manifest.name} ({len(track.eval_tasks)} tasks)")
        results = []
        scorer = None
        for task in track.eval_tasks:
            try:
                if task.id in self.errors:
                    raise DataError(self.errors[task.id])
                rows = self._predictions(task, stores[task.id], predict, run_dir, codec)
                scorer = scorer or self._caption_scorer(task)
                with waiting(f"scoring {task.id}", enabled=self.opts.progress):
                    value = _score(task, rows, scorer)
                results.append(TaskResult(task.id, task.hidden, task.metric, value, len(rows)))
                self.echo(f"  - {task.id}: {task.metric} {100 * value:.1f} ({len(rows)} samples)")
            except XaresError as e:  # one bad task is reported, the run goes on
                if isinstance(e, SubmissionError):
                    raise
                results.append(TaskResult(task.id, task.hidden, task.metric or "?", 0.0, 0, failed=True,
                                          error=first_line(e)))
                self.echo(f"  - {task.id}: FAILED: {e}")
        return results

    def decoding_options(self):
        from evaluator.generation import DecodingOptions

        # The eval YAML's batch_size (4 for many tasks) sized the reference's stock loop; greedy answers do
        # not depend on it, so our engine keeps its own, larger default unless --eval-batch-size says so.
        return DecodingOptions(max_new_tokens=self.opts.max_new_tokens, threads=self.opts.threads,
                               batch_size=self.opts.eval_batch_size, compile=self.opts.compile,
                               precision=self.opts.precision)

    def _predictions(self, task: TaskSpec, store: FeatureStore, predict: Predict, run_dir: Path,
                     codec) -> list[dict]:
        """Predictions of one task with sample ids, in data order; reused when already complete.

        Each row also lists ``ref_index``: where each of its references lands in the reference's own
        predictions_<task>.csv (one sample per reference there), to diff the two line by line.
        """
        path = run_dir / PREDICTIONS_DIR / f"{task.id}.jsonl"
        if path.exists():
            return [json.loads(line) for line in path.read_text().splitlines() if line]
        dataset = store.dataset(prompt=task.prompt, task=task.id)
        predictions = predict(task, dataset) if len(dataset) else []
        rows = [{"id": p.key, "prediction": p.text, "references": list(dataset.targets(i)), "status": "ok"}
                for i, p in enumerate(predictions)]
        # clips the encoder failed on stay in the test set, scored as wrong (empty prediction)
        rows += [{"id": f.key, "prediction": "", "references": list(f.targets), "status": "encoder_failed",
                  "error": f.reason} for f in store.failures.values()]
        order = {**{e.key: e.ordinal for e in store.entries.values()},
                 **{f.key: f.ordinal for f in store.failures.values()}}
        rows.sort(key=lambda r: order[r["id"]])
        # (seconds, own prompt) of every clip: what the reference's order sorts by
        meta = {**{dataset.key(i): (dataset.seconds(i), dataset.sample_prompt(i)) for i in range(len(dataset))},
                **{f.key: (f.seconds, f.prompt) for f in store.failures.values()}}
        samples = []
        for r in rows:
            seconds, own = meta[r["id"]]
            prompt = codec.prompt_ids(choose_prompt(task.prompt, own, draw=prompt_draw(r["id"])))
            samples.append(EvalSample(r["id"].rsplit("/", 1)[0], len(r["references"]), len(prompt), seconds))
        for r, index in zip(rows, reference_eval_order(task, samples, data_home=self.opts.data_home)):
            r["ref_index"] = list(index)
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        return rows

    def _caption_scorer(self, task: TaskSpec):
        from evaluator.metrics import METRICS, MetricModels, get_metric, load_caption_scorer

        get_metric(task.metric)  # unknown names fail here, with close matches
        if METRICS[task.metric].needs_models:
            return load_caption_scorer(MetricModels.from_env())
        return None


def _score(task: TaskSpec, rows: list[dict], scorer) -> float:
    from evaluator.metrics import METRICS, score

    if not rows:
        raise DataError(f"task {task.id} has no test samples to score")
    kwargs = dict(task.metric_args)
    if METRICS[task.metric].needs_models:
        kwargs["scorer"] = scorer
    return score(task.metric, [r["prediction"] for r in rows], [r["references"] for r in rows], **kwargs)


# ---- helpers -------------------------------------------------------------------------------------
def loss_curve(losses: list[float], points: int = LOSS_POINTS) -> list[list[float]]:
    """[step, mean loss] over equal windows of the steps: the training curve, small enough for a page."""
    if not losses:
        return []
    window = max(1, -(-len(losses) // points))
    return [[min(start + window, len(losses)), round(sum(losses[start:start + window]) / len(losses[start:start + window]), 5)]
            for start in range(0, len(losses), window)]


def _task_identity(task: TaskSpec, store: FeatureStore | None) -> dict:
    return {"id": task.id, "prompt": task.prompt, "train_prompt": task.prompt_for_training, "metric": task.metric,
            "metric_args": task.metric_args, "store": store.path.name if store is not None else None}


def _decoder_identity(name: str, digests: DigestCache) -> dict:
    """What the decoder is: a local folder by the digest of its files, a hub name by its name."""
    folder = Path(name)
    if not folder.is_dir():
        return {"name": name}
    files = sorted(f for f in folder.rglob("*") if f.is_file())
    return {"path": str(folder.resolve()),
            "files": {str(f.relative_to(folder)): digests.sha256(f) for f in files}}


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(_jsonable(obj), sort_keys=True).encode()).hexdigest()


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj




def _write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(_jsonable(obj), indent=2, ensure_ascii=False) + "\n")


def _write_scores_tsv(path: Path, document: dict) -> None:
    from evaluator.cli.leaderboard import build_table, render_tsv
    from evaluator.scoring import leaderboard, parse_results

    header, body = build_table(leaderboard([parse_results(document, source=str(path))]))
    atomic_write_text(path, render_tsv(header, body))


class _Transcript:
    """Every step line of one submission's run (passed on to the caller's echo) and the evaluator's log
    records while it scores: the run's run.log."""

    def __init__(self, echo: Echo):
        self.echo = echo
        self.lines: list[str] = []

    def __call__(self, line: str) -> None:
        self.record(line)
        self.echo(line)

    def record(self, line: str) -> None:
        self.lines.append(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}")


@contextlib.contextmanager
def _log_to(transcript: _Transcript) -> Iterator[None]:
    """Copy the evaluator's INFO log records into the transcript while the run scores."""

    class Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            transcript.record(f"{record.levelname} {record.name}: {record.getMessage()}")

    handler = Handler(logging.INFO)
    root = logging.getLogger("evaluator")
    old = root.level
    root.addHandler(handler)
    if root.level == logging.NOTSET or root.level > logging.INFO:
        root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(old)
