"""A campaign: many submissions on several tracks in one command, as a graph of stages, resumable.

    xares-eval campaign subs/*.tar --tracks A,A-hidden,B,B-hidden --out camp/ [--jobs N | --ray [ADDRESS]]
    xares-eval campaign status camp/

The campaign is planned as a dependency graph of three kinds of job:

    extract/<track>/<submission>    check the submission, probe it, store its features for the track
    train/<decoder track>/<subs>    train the decoder(s): one submission, or a pack of them (--pack)
    score/<track>/<submission>      generate and score; after its extraction and its decoder's training

(B-hidden's score jobs wait for Track B's train jobs). Every job is `run_stage`, a function of small
picklable values that resumes from the hash-keyed folders of `evaluator.runner` under ``<out>/runs``:
whatever ran before, in this campaign or in a `xares-eval run`, is found there and skipped. An executor
runs the graph: in this process one job at a time, in ``--jobs N`` worker processes, or as Ray tasks
with declared resources, each waiting on its dependencies' results and retried when its worker is lost.

Only the campaign's own process writes ``<out>/campaign.json`` (atomically, at every finished job); a
job writes its start (host, pid, time) and its log under ``<out>/logs``, so `status` shows what runs
where while the campaign goes on, and what a dead campaign left "interrupted". A failed job fails the
jobs that need it, with its reason; the other submissions go on. When the graph is through,
``leaderboard.{md,tsv,html}`` are written, failed submissions with their reasons below the ranking.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import re
import socket
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from evaluator.errors import ConfigError, XaresError, first_line
from evaluator.fileio import atomic_write_text
from evaluator.progress import lines_to

STATE_FILE = "campaign.json"
STATE_FORMAT = "xares-eval/campaign/2"
OLDER_FORMATS = ("xares-eval/campaign/1",)  # one record per submission and track
RUNS_DIR = "runs"
LOGS_DIR = "logs"


# ---- the graph -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Job:
    """One node of the graph."""

    id: str  # "<kind>/<track>/<submission>[+<submission>...]"
    kind: str  # extract | train | score
    track: str  # extract, score: the campaign track; train: the decoder's track
    submissions: tuple[str, ...]  # archive file names (a train job of a pack has several)
    deps: tuple[str, ...] = ()
    via: str = ""  # train: the campaign track whose extraction stored its training features


def track_order(tracks: Sequence) -> list:
    """Tracks with every decoder track before the tracks scored with its decoder (B before B-hidden)."""
    names = {t.name for t in tracks}
    first = [t for t in tracks if t.decoder_track == t.name or t.decoder_track not in names]
    return first + [t for t in tracks if t not in first]


def plan_jobs(submissions: Sequence[str], tracks: Sequence, pack: int | None) -> list[Job]:
    """The campaign's jobs in an order where every job comes after its dependencies.

    Args:
        submissions: archive file names.
        tracks: `TrackSpec`s (only ``name`` and ``decoder_track`` are read).
        pack: decoders per train job (1: one job per submission; None: one job for all, sized on its node).
    """
    ordered = track_order(tracks)
    jobs = [Job(f"extract/{t.name}/{s}", "extract", t.name, (s,)) for t in ordered for s in submissions]
    via: dict[str, str] = {}  # decoder track -> the campaign track whose extraction covers its training split
    for t in ordered:
        if t.decoder_track not in via or t.name == t.decoder_track:
            via[t.decoder_track] = t.name
    size = pack or max(1, len(submissions))
    trained_by: dict[tuple[str, str], str] = {}
    for decoder, track in via.items():
        for start in range(0, len(submissions), size):
            chunk = tuple(submissions[start : start + size])
            job = Job(f"train/{decoder}/{'+'.join(chunk)}", "train", decoder, chunk,
                      tuple(f"extract/{track}/{s}" for s in chunk), via=track)
            jobs.append(job)
            trained_by.update({(decoder, s): job.id for s in chunk})
    for t in ordered:
        for s in submissions:
            jobs.append(Job(f"score/{t.name}/{s}", "score", t.name, (s,),
                            (f"extract/{t.name}/{s}", trained_by[t.decoder_track, s])))
    return jobs


# ---- one stage, wherever it runs ------------------------------------------------------------------
@dataclass(frozen=True)
class StageCall:
    """Everything a worker needs to run one job (plain values: it crosses process and node boundaries)."""

    job: Job
    archives: tuple[str, ...]  # absolute paths, in the order of job.submissions
    opts: object  # RunOptions, with absolute paths
    pack: int | None
    out: str  # the campaign folder, absolute
    tracks: dict = field(default_factory=dict)  # track name -> TrackSpec (resolved by the driver)


@dataclass(frozen=True)
class StageResult:
    """What a job left: done or failed (with the reason), and where and how long it ran."""

    job: str
    ok: bool
    reason: str = ""
    submissions: tuple[str, ...] = ()  # the job's
    seconds: float = 0.0
    results: str = ""  # score: results.json, absolute
    failed: dict = field(default_factory=dict)  # train: submission -> why its decoder was not trained
    where: str = ""  # host:pid

    def reason_for(self, submission: str) -> str | None:
        """Why ``submission`` cannot go on after this job (None: it can)."""
        if submission not in self.submissions:
            return None
        if submission in self.failed:
            return self.failed[submission]
        return None if self.ok else self.reason


def log_path(out: Path, job_id: str) -> Path:
    return Path(out) / LOGS_DIR / (re.sub(r"[^A-Za-z0-9._+-]", "_", job_id.replace("/", "__")) + ".log")


def run_stage(call: StageCall, *deps: StageResult) -> StageResult:
    """Run one job after its dependencies' results ``deps``; never raises for what a submission did wrong.

    A dependency that failed fails the job's submissions with its reason, without any work. The job's
    step lines go to its log file; its start (host, pid, time) beside it.
    """
    from evaluator.runner import prepare_submission, run_submission, run_submissions

    job, t0 = call.job, time.monotonic()
    where = _where()
    log = log_path(Path(call.out), job.id)
    log.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(log.with_suffix(".start.json"),
                      json.dumps({"host": platform.node(), "pid": os.getpid(), "started": time.time()}) + "\n")

    def result(ok: bool, reason: str = "", **extra) -> StageResult:
        return StageResult(job.id, ok, reason, job.submissions, round(time.monotonic() - t0, 1), where=where, **extra)

    blocked = {s: _blocked(s, deps) for s in job.submissions}
    live = [(s, a) for s, a in zip(job.submissions, call.archives) if blocked[s] is None]
    if not live:
        return result(False, next(iter(blocked.values())), failed={s: r for s, r in blocked.items()})
    with open(log, "a", encoding="utf-8") as stream, contextlib.ExitStack() as reports:
        def echo(line: str) -> None:
            stream.write(f"{time.strftime('%H:%M:%S')} {line}\n")
            stream.flush()

        reports.enter_context(lines_to(echo))  # the stages' progress lines ("[training] 1200/100000 steps") too
        echo(f"== {job.id} on {where}")
        track = call.tracks[job.via or job.track]
        train_track = call.tracks.get(track.decoder_track)
        try:
            if job.kind == "extract":
                prepare_submission(Path(live[0][1]), track, call.opts, echo=echo, train_track=train_track)
                return result(True)
            if job.kind == "train":
                outcomes = run_submissions([Path(a) for _, a in live], track, call.opts, pack=call.pack, echo=echo,
                                           train_track=train_track, score=False)
                failed = {s: r for s, r in blocked.items() if r is not None}
                failed.update({s: f"train: {first_line(o.error)}" for (s, _), o in zip(live, outcomes)
                               if o.error is not None})
                if len(failed) == len(job.submissions):
                    return result(False, next(iter(failed.values())), failed=failed)
                return result(True, f"{len(failed)} of {len(job.submissions)} failed" if failed else "", failed=failed)
            outcome = run_submission(Path(live[0][1]), track, call.opts, echo=echo, train_track=train_track)
            return result(True, results=str(outcome.results_path))
        except XaresError as e:
            echo(f"FAILED: {first_line(e)}")
            return result(False, f"{job.kind}: {first_line(e)}")
        except Exception as e:  # noqa: BLE001 - our own bug: recorded with its traceback, the others go on
            stream.write(traceback.format_exc())
            return result(False, f"{job.kind}: internal error ({type(e).__name__}: {first_line(e)}); see {log}")


def _where() -> str:
    """host:pid, and the Ray node when this is a Ray worker."""
    where = f"{platform.node()}:{os.getpid()}"
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        with contextlib.suppress(Exception):  # not a worker: the driver's own context has no node to tell
            where += f" node {ray.get_runtime_context().get_node_id()[:8]}"
    return where


def _blocked(submission: str, deps: Sequence[StageResult]) -> str | None:
    for dep in deps:
        reason = dep.reason_for(submission)
        if reason is not None:
            return reason
    return None


# ---- executors -----------------------------------------------------------------------------------
Done = Callable[[StageResult], None]


@dataclass(frozen=True)
class LocalExecutor:
    """This machine: one job at a time in this process, or ``jobs`` worker processes."""

    jobs: int = 1
    retries: int = 1  # reruns of a job whose worker process died

    def run(self, calls: list[StageCall], finished: dict[str, StageResult], done: Done) -> None:
        if self.jobs == 1:
            for call in calls:
                result = run_stage(call, *(finished[d] for d in call.job.deps))
                finished[call.job.id] = result
                done(result)
            return
        self._parallel(calls, finished, done)

    def _parallel(self, calls: list[StageCall], finished: dict[str, StageResult], done: Done) -> None:
        import multiprocessing
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
        from concurrent.futures.process import BrokenProcessPool

        waiting = list(calls)
        tries = {c.job.id: 0 for c in calls}
        context = multiprocessing.get_context("spawn")  # no forked torch or threads
        while waiting:
            with ProcessPoolExecutor(self.jobs, mp_context=context) as pool:
                running = {}
                while waiting or running:
                    for call in [c for c in waiting if all(d in finished for d in c.job.deps)][: self.jobs - len(running)]:
                        waiting.remove(call)
                        running[pool.submit(run_stage, call, *(finished[d] for d in call.job.deps))] = call
                    if not running:  # the calls come in graph order: something is always ready
                        raise RuntimeError(f"no job can start: {[c.job.id for c in waiting]}")
                    ready, _ = wait(running, return_when=FIRST_COMPLETED)
                    broken = False
                    for future in ready:
                        call = running.pop(future)
                        try:
                            result = future.result()
                        except BrokenProcessPool:
                            broken = True
                            tries[call.job.id] += 1
                            if tries[call.job.id] <= self.retries:
                                waiting.insert(0, call)
                                continue
                            result = StageResult(call.job.id, False, f"{call.job.kind}: its worker process died "
                                                 f"{tries[call.job.id]} times", call.job.submissions)
                        finished[call.job.id] = result
                        done(result)
                    if broken:  # the pool is unusable: the jobs still in it are rerun in a new one
                        waiting[:0] = running.values()
                        break


@dataclass(frozen=True)
class StageResources:
    """What each job asks of a Ray node (Ray schedules on these; the sandbox still caps the encoder)."""

    extract_cpus: float = 1.0
    extract_memory_mb: int = 4096
    train_cpus: float = 1.0
    train_memory_mb: int = 8192
    gpu_share: float = 0.25  # GPUs per train and score job where the cluster has GPUs: four share one
    retries: int = 3  # reruns of a job whose worker or node was lost

    def options(self, job: Job, cluster_gpus: float, opts) -> dict:
        if job.kind == "extract":
            cpus, memory, gpus = self.extract_cpus, self.extract_memory_mb, 1.0 if opts.gpu and cluster_gpus else 0.0
        else:
            cpus, memory = self.train_cpus, self.train_memory_mb
            gpus = self.gpu_share if cluster_gpus and opts.device != "cpu" else 0.0
        return {"num_cpus": cpus, "memory": memory * 2**20, "num_gpus": gpus, "max_retries": self.retries,
                "retry_exceptions": False, "name": job.id}


@dataclass(frozen=True)
class RayExecutor:
    """A Ray cluster (``address``: "auto", "host:port"; None: a Ray instance started here).

    Each job is a Ray task given its dependencies' results as object references, so Ray itself orders,
    places and retries them; this process only records what comes back.
    """

    address: str | None = None
    resources: StageResources = StageResources()

    def run(self, calls: list[StageCall], finished: dict[str, StageResult], done: Done) -> None:
        try:
            import ray
        except ImportError:
            raise ConfigError("--ray needs Ray: pip install 'xares-eval[cluster]'") from None
        from ray.exceptions import RayError

        _check_reachable(self.address)
        try:
            if self.address:
                ray.init(address=self.address, log_to_driver=False, configure_logging=False)
            else:
                ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise ConfigError(f"cannot reach the Ray cluster {self.address or '(local)'}: {first_line(e)}") from None
        try:
            gpus = ray.cluster_resources().get("GPU", 0.0)
            _check_fits([n["Resources"] for n in ray.nodes() if n.get("Alive")],
                        {c.job.kind: self.resources.options(c.job, gpus, c.opts) for c in calls})
            stage = ray.remote(run_stage)
            refs: dict[str, object] = {}
            jobs = {call.job.id: call.job for call in calls}
            for call in calls:
                args = [refs.get(d, finished.get(d)) for d in call.job.deps]
                options = self.resources.options(call.job, gpus, call.opts)
                if call.opts.threads is None:  # the CPUs it asked for, not the node's: jobs share the node's cores
                    call = dataclasses.replace(call, opts=dataclasses.replace(
                        call.opts, threads=max(1, int(options["num_cpus"]))))
                refs[call.job.id] = stage.options(**options).remote(call, *args)
            pending = {ref: job_id for job_id, ref in refs.items()}
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                job_id = pending.pop(ready[0])
                kind = job_id.split("/", 1)[0]
                try:
                    result = ray.get(ready[0])
                except RayError as e:  # retries spent, or a dependency's were
                    result = StageResult(job_id, False, f"{kind}: lost on the cluster ({type(e).__name__}: "
                                         f"{first_line(e)})", jobs[job_id].submissions)
                finished[job_id] = result
                done(result)
        finally:
            ray.shutdown()


def _check_reachable(address: str | None, timeout: float = 10.0) -> None:
    """Fail in seconds on a cluster that is not there: Ray's own client retries for minutes."""
    if address == "auto":  # where Ray itself looks: $RAY_ADDRESS, then the last cluster started on this machine
        address = os.environ.get("RAY_ADDRESS")
        with contextlib.suppress(OSError):
            address = address or Path("/tmp/ray/ray_current_cluster").read_text().strip()
        if not address:
            raise ConfigError("--ray auto: no Ray cluster on this machine (start one with `ray start --head`, or "
                              "give its address)")
    if not address or "://" in address:  # a local instance, or Ray Client: Ray checks those itself
        return
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout).close()
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot reach the Ray cluster at {address}: {first_line(e)}") from None


def _check_fits(nodes: list[dict], asks: dict[str, dict]) -> None:
    """Fail now, not never: Ray keeps a task no node can hold waiting forever."""
    names = {"num_cpus": "CPU", "num_gpus": "GPU", "memory": "memory"}
    for kind, options in asks.items():
        want = {names[k]: v for k, v in options.items() if k in names and v}
        if not any(all(node.get(r, 0) >= v for r, v in want.items()) for node in nodes):
            asked = ", ".join(f"{v / 2**30:.1f} GiB memory" if r == "memory" else f"{v:g} {r}" for r, v in want.items())
            raise ConfigError(f"no node of the Ray cluster can run a {kind} job ({asked}): start nodes with more "
                              "resources, or lower them (--gpu-share)")


# ---- the campaign's state ------------------------------------------------------------------------
@dataclass
class JobRecord:
    """One job in campaign.json."""

    id: str
    kind: str
    track: str
    submissions: list[str]
    deps: list[str] = field(default_factory=list)
    status: str = "waiting"  # waiting | done | failed (read back: running | interrupted too)
    reason: str = ""  # why it failed (or which members of a pack did)
    seconds: float | None = None
    results: str = ""  # score: results.json, relative to the campaign folder
    failed: dict = field(default_factory=dict)  # train: submission -> reason
    where: str = ""  # host:pid of its last run
    inputs: dict = field(default_factory=dict)  # submission -> "size:mtime" of the archive it ran on

    def result(self) -> StageResult:
        return StageResult(self.id, self.status == "done", self.reason, tuple(self.submissions), self.seconds or 0.0,
                           self.results, dict(self.failed), self.where)


class Campaign:
    """A campaign folder's state: its job records and the process running it, saved after every change."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.path = self.out / STATE_FILE
        self.records: dict[str, JobRecord] = {}
        self.settings: dict = {}
        self.driver: dict = {}
        if self.path.exists() and not _older(self.path):  # an older layout: planned afresh (the runs reuse their work)
            doc = _read(self.path)
            self.records = {r.id: r for r in doc[0]}
            self.settings, self.driver = doc[1], doc[2]

    def plan(self, jobs: Sequence[Job], settings: dict, inputs: dict[str, str]) -> list[Job]:
        """Records for ``jobs``; returns the jobs to run. A job done before is kept unless the settings or
        one of its archives changed since (then it runs again, and the runs reuse what their keys allow)."""
        if settings != self.settings:
            self.records = {}
        self.settings = settings

        def kept(job: Job) -> bool:
            r = self.records.get(job.id)
            return (r is not None and r.status == "done" and not r.failed
                    and r.inputs == {s: inputs[s] for s in job.submissions}
                    and (job.kind != "score" or (self.out / r.results).is_file()))

        self.records = {j.id: self.records[j.id] if kept(j) else
                        JobRecord(j.id, j.kind, j.track, list(j.submissions), list(j.deps),
                                  inputs={s: inputs[s] for s in j.submissions}) for j in jobs}
        self.driver = {"host": platform.node(), "pid": os.getpid(), "started": time.time()}
        self.save()
        return [j for j in jobs if self.records[j.id].status != "done"]

    def finish(self, result: StageResult) -> None:
        record = self.records[result.job]
        record.status = "done" if result.ok else "failed"
        record.reason, record.seconds, record.failed, record.where = (result.reason, result.seconds,
                                                                      dict(result.failed), result.where)
        if result.results:
            record.results = os.path.relpath(result.results, self.out.resolve())
        self.save()

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        doc = {"format": STATE_FORMAT, "settings": self.settings, "driver": self.driver,
               "jobs": [dataclasses.asdict(r) for r in self.records.values()]}
        atomic_write_text(self.path, json.dumps(doc, indent=2) + "\n")


def _older(path: Path) -> bool:
    with contextlib.suppress(OSError, ValueError, AttributeError):
        return json.loads(path.read_text()).get("format") in OLDER_FORMATS
    return False


def _read(path: Path) -> tuple[list[JobRecord], dict, dict]:
    try:
        doc = json.loads(path.read_text())
        if doc.get("format") != STATE_FORMAT:
            raise ValueError(f"format {doc.get('format')!r}, expected {STATE_FORMAT!r}")
        return [JobRecord(**job) for job in doc["jobs"]], doc.get("settings", {}), doc.get("driver", {})
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ConfigError(f"{path} is not a campaign state file: {first_line(e)}") from e


def read_state(out: Path) -> list[JobRecord]:
    """The job records of a campaign folder as they stand: a waiting job that has started since the
    campaign did reads "running" while the campaign's process lives, "interrupted" once it is gone.

    Raises:
        ConfigError: the folder holds no campaign, or its state file is not one.
    """
    path = Path(out) / STATE_FILE
    if not path.is_file():
        raise ConfigError(f"{out} is not a campaign folder (no {STATE_FILE})")
    records, _, driver = _read(path)
    alive = _alive(driver)
    for r in records:
        if r.status != "waiting":
            continue
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            start = json.loads(log_path(out, r.id).with_suffix(".start.json").read_text())
            if start["started"] >= driver.get("started", 0):
                r.status = "running" if alive else "interrupted"
                r.where = f"{start['host']}:{start['pid']}"
                if alive:
                    r.seconds = round(time.time() - start["started"], 1)
    return records


def _alive(driver: dict) -> bool:
    """Whether the campaign's process still runs (one on another host is taken to)."""
    pid = driver.get("pid")
    if not pid:
        return False
    if driver.get("host") != platform.node():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---- the command ---------------------------------------------------------------------------------
def run_campaign(submissions: Sequence[Path], tracks: Sequence, out: Path, opts, *, pack: int | None,
                 executor: LocalExecutor | RayExecutor = LocalExecutor(),
                 echo: Callable[[str], None] = print) -> list[JobRecord]:
    """Plan the graph of every submission on every track, run what is not done, write the leaderboard.

    Args:
        submissions: submission.tar files (their names must differ).
        tracks: `TrackSpec`s to run.
        out: the campaign folder; ``<out>/runs`` is the runs' output root.
        opts: `RunOptions` (``out`` is replaced by ``<out>/runs``).
        pack: decoders per train job (None: as many as fit; 1: one at a time).
        executor: where the jobs run.
        echo: one line per finished job.

    Returns:
        The job records, after the campaign.
    """
    names = [Path(s).name for s in submissions]
    if len(set(names)) != len(names):
        raise ConfigError("two submissions share a file name; rename one (the leaderboard tells them apart by it)")
    out = Path(out).resolve()
    opts = _absolute(dataclasses.replace(opts, out=out / RUNS_DIR))
    if isinstance(executor, LocalExecutor) and executor.jobs > 1 and opts.threads is None:
        from evaluator.cores import usable_cpus

        opts = dataclasses.replace(opts, threads=max(1, usable_cpus() // executor.jobs))
    settings = json.loads(json.dumps({k: str(v) for k, v in dataclasses.asdict(opts).items()
                                      if k not in ("progress", "machine", "threads")}))
    jobs = plan_jobs(names, tracks, pack)
    campaign = Campaign(out)
    stage_opts = dataclasses.replace(opts, progress=False)  # a job's lines go to its log; the bar is the campaign's
    archives = {Path(s).name: str(Path(s).resolve()) for s in submissions}
    todo = campaign.plan(jobs, settings, {name: _fingerprint(Path(path)) for name, path in archives.items()})
    by_name = {t.name: t for t in tracks}
    calls = []
    for job in todo:
        needed = {job.via or job.track}
        needed.add(by_name[job.via or job.track].decoder_track)
        specs = {n: by_name[n] for n in needed if n in by_name}
        calls.append(StageCall(job, tuple(archives[s] for s in job.submissions), stage_opts, pack, str(out), specs))
    if not todo:
        echo(f"every one of the {len(jobs)} jobs is done")
    else:
        echo(f"{len(todo)} of {len(jobs)} jobs to run ({_describe(executor)}); logs in {out / LOGS_DIR}")
        finished = {r.id: r.result() for r in campaign.records.values() if r.status == "done"}
        with _Display(len(todo), opts.progress and sys.stdout.isatty(), echo) as display:
            def done(result: StageResult) -> None:
                campaign.finish(result)
                display.advance(result)

            executor.run(calls, finished, done)
    records = list(campaign.records.values())
    write_leaderboard(out, records)
    scored = [out / r.results for r in records if r.kind == "score" and r.status == "done"]
    if scored:
        from evaluator.report import build_site

        echo(f"Site: {build_site(scored, out / 'site')}")
    return records


def _fingerprint(archive: Path) -> str:
    """Size and modification time: a resubmitted archive under the same name is evaluated again."""
    stat = archive.stat()
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def _absolute(opts):
    """Paths made absolute: a job may run in another process, on another node, from another folder."""
    changes = {}
    for name in ("out", "store_root", "data_home", "hidden_config"):
        value = getattr(opts, name)
        if value is not None:
            changes[name] = Path(value).resolve()
    if opts.decoder and Path(opts.decoder).exists():
        changes["decoder"] = str(Path(opts.decoder).resolve())
    return dataclasses.replace(opts, **changes)


def _describe(executor) -> str:
    if isinstance(executor, RayExecutor):
        return f"Ray at {executor.address}" if executor.address else "a local Ray instance"
    return "in this process" if executor.jobs == 1 else f"{executor.jobs} worker processes"


class _Display:
    """A progress bar over the jobs (when enabled) and one line per finished job."""

    def __init__(self, total: int, enabled: bool, echo: Callable[[str], None]):
        self.total, self.enabled, self.echo, self.count = total, enabled, echo, 0
        self._bar = None

    def __enter__(self) -> _Display:
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(TextColumn("[bold]campaign"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), transient=True)
            self._bar.start()
            self._task = self._bar.add_task("jobs", total=self.total)
        return self

    def advance(self, result: StageResult) -> None:
        self.count += 1
        state = "done" if result.ok else "FAILED"
        line = f"[{self.count}/{self.total}] {state} {result.job} ({result.seconds:.0f} s)"
        if result.reason:
            line += f": {result.reason}"
        if self._bar is not None:
            self._bar.console.print(line, markup=False, highlight=False)
            self._bar.advance(self._task)
        else:
            self.echo(line)

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()


def write_leaderboard(out: Path, records: Sequence[JobRecord]) -> dict[str, Path]:
    """leaderboard.md, .tsv and .html of the scored jobs, with the failed ones and their reasons after."""
    from evaluator.cli.leaderboard import build_table, render_html, render_md, render_tsv
    from evaluator.scoring import leaderboard, load_results

    scored = [r for r in records if r.kind == "score"]
    done = [load_results(Path(out) / r.results) for r in scored if r.status == "done"]
    header, body = build_table(leaderboard(done)) if done else (["rank", "submission"], [])
    failed = [[r.submissions[0], r.track, r.reason or r.status] for r in scored if r.status != "done"]
    written = {}
    for fmt, render in (("md", render_md), ("tsv", render_tsv), ("html", render_html)):
        text = render(header, body)
        if failed:
            more = render(["submission", "track", "failed"], failed)
            if fmt == "html":  # the failures' table inside the same page
                table = more[more.index("<table"): more.rindex("</table>") + len("</table>")]
                text = text.replace("</body>", f"<h2>Failed</h2>{table}</body>")
            else:
                text += "\n" + more
        path = Path(out) / f"leaderboard.{fmt}"
        atomic_write_text(path, text)
        written[fmt] = path
    return written


def status_table(records: Sequence[JobRecord]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of `xares-eval campaign status`."""
    rows = [[r.id, r.status, "" if r.seconds is None else f"{r.seconds:.0f} s", r.where, r.reason] for r in records]
    return ["job", "status", "time", "where", "reason"], rows
