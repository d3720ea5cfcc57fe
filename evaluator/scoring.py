"""From results documents to challenge scores and a ranked leaderboard (pure functions).

The challenge rule (paper): a track's score is the mean of the public tasks' scores and the mean of the
hidden tasks' scores, averaged: ``(mean(public) + mean(hidden)) / 2``. With several machines, each
task's maximum over machines is taken first.

How results files combine into one leaderboard row:

* Files are grouped by submission sha256 and *base track*: "A" and "A-hidden" both feed Track A,
  "B" and "B-hidden" Track B (any "<x>-hidden" feeds "<x>"). Each task says itself whether it is
  hidden (``hidden: true``); that flag, not the file's track, decides which half it counts in.
* Per task, the best score over all files of the group is kept (machines, reruns). A failed task
  counts as 0 and is shown as failed; it only survives when no file has it succeeding.
* A half with no task at all (e.g. only the A results so far) leaves the score as the mean of the
  half that exists, and the row is flagged ``partial``.
* Inside a half that exists, a task that other submissions of the same track have but this one lacks
  counts as 0 and is listed as missing: leaving out a bad task must not raise a rank.

Example::

    rows = leaderboard(load_many(["run1/results.json", "run2/results.json"]))
"""

from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from evaluator.errors import DataError
from evaluator.resources import schema_errors

logger = logging.getLogger(__name__)

HIDDEN_SUFFIX = "-hidden"
TRACK_ORDER = ("A", "B")  # shown first; other tracks (demo-a, ...) follow alphabetically
TWO_HALF_TRACKS = frozenset(TRACK_ORDER)  # tracks with a hidden half; others (demo, custom) are public only
TIE_DIGITS = 9  # scores equal to 9 decimals share a rank (float noise is not a difference)


@dataclass(frozen=True)
class TaskResult:
    task: str
    hidden: bool
    metric: str
    score: float  # in [0, 1] (FENSE, DATE: [-1, 1]); 0 when failed
    n_samples: int
    failed: bool = False
    error: str | None = None
    machine: str = ""  # where this score was measured


@dataclass(frozen=True)
class Results:
    """One results document (one run on one machine)."""

    submission: str
    sha256: str
    machine: str
    track: str
    tasks: tuple[TaskResult, ...]
    source: str = "<document>"  # file it came from, for messages


@dataclass(frozen=True)
class Entry:
    """One submission on one base track after the per-task maximum over files."""

    submission: str
    sha256: str
    track: str  # base track ("A", not "A-hidden")
    tasks: tuple[TaskResult, ...]  # one per task name, sorted (public first, then by name)
    machines: tuple[str, ...]
    sources: tuple[str, ...]


@dataclass(frozen=True)
class TrackScore:
    score: float  # the track score (FENSE and DATE may pull it below 0)
    public: float | None  # mean of the public tasks, None when there are none
    hidden: float | None  # mean of the hidden tasks, None when there are none
    partial: bool  # one half is absent: score is the mean of the other
    failed: tuple[str, ...] = ()  # counted as 0
    missing: tuple[str, ...] = ()  # expected (others have them), absent here, counted as 0
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Row:
    rank: int  # ties share a rank (1, 1, 3)
    entry: Entry
    result: TrackScore
    expected: tuple[tuple[str, bool], ...] = field(default=())  # the track's task columns (name, hidden)


def base_track(track: str) -> str:
    """The leaderboard track a results file feeds: 'A-hidden' -> 'A', 'B' -> 'B'."""
    return track.removesuffix(HIDDEN_SUFFIX)


# --- reading ---------------------------------------------------------------------------------------


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")  # json accepts NaN/Infinity by default; a score can't be


def parse_results(document: object, *, source: str = "<document>") -> Results:
    """Check a results document against results.schema.json and read it.

    Raises:
        DataError: the document breaks the schema (every violation listed in ``reasons``).
    """
    problems = schema_errors(document, "results")
    if problems:
        raise DataError(f"{source}: does not match results.schema.json", reasons=problems)
    assert isinstance(document, dict)  # the schema says so
    machine = document["machine"]
    tasks = []
    seen = set()
    for t in document["tasks"]:
        if t["task"] in seen:
            raise DataError(f"{source} lists task {t['task']!r} twice")
        seen.add(t["task"])
        failed = t.get("status", "ok") == "failed"
        tasks.append(TaskResult(
            task=t["task"], hidden=t["hidden"], metric=t["metric"],
            score=0.0 if failed else float(t["score"]), n_samples=t["n_samples"],
            failed=failed, error=t.get("error"), machine=machine,
        ))
    sub = document["submission"]
    return Results(sub["name"], sub["sha256"], machine, document["track"], tuple(tasks), source)


def load_results(path: str | Path) -> Results:
    """Read and check one results.json.

    Raises:
        DataError: missing, unreadable, not JSON, or not schema-valid (message names the file).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise DataError(f"{path}: no such file") from e
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read it ({e})") from e
    try:
        document = json.loads(text, parse_constant=_reject_constant)
    except ValueError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from e
    return parse_results(document, source=str(path))


def load_many(paths: Sequence[str | Path]) -> list[Results]:
    """Read every file, refusing them all if any is bad: a leaderboard must not silently drop one.

    Raises:
        DataError: one reason line per bad file ("path: problem").
    """
    results, bad = [], []
    for path in paths:
        try:
            results.append(load_results(path))
        except DataError as e:
            detail = "; ".join(e.reasons[:3]) + ("; ..." if len(e.reasons) > 3 else "")
            bad.append(f"{e}: {detail}" if detail else str(e))
    if bad:
        raise DataError(f"{len(bad)} of {len(paths)} results files are unusable; nothing was ranked", reasons=bad)
    return results


def results_document(
    *, submission: str, sha256: str, machine: str, track: str, tasks: Iterable[TaskResult], **extra: object
) -> dict:
    """The results.json document of one run (what `load_results` reads back).

    Args:
        submission: the encoder's name; sha256: the submission archive's digest.
        machine: where it ran (e.g. host name + device), used for the per-task maximum across machines.
        track: the track run ("A", "A-hidden", "B", "B-hidden", "demo-a", ...).
        tasks: one result per task; a failed one is written with status "failed", score 0 and its error.
        **extra: optional top-level fields of the schema (created, evaluator_version, run_key, config).

    Raises:
        RuntimeError: the document breaks results.schema.json (a bug in the caller, not user input).
    """
    rows = []
    for t in tasks:
        row = {"task": t.task, "hidden": t.hidden, "metric": t.metric, "score": 0.0 if t.failed else t.score,
               "n_samples": t.n_samples, "status": "failed" if t.failed else "ok"}
        if t.error:
            row["error"] = t.error
        rows.append(row)
    document = {"schema_version": 1, "submission": {"name": submission, "sha256": sha256}, "machine": machine,
                "track": track, "tasks": rows, **extra}
    problems = schema_errors(document, "results")
    if problems:
        raise RuntimeError(f"results document breaks results.schema.json: {'; '.join(problems)}")
    return document


# --- merging and scoring ---------------------------------------------------------------------------


def _best(a: TaskResult, b: TaskResult) -> TaskResult:
    """The better of two results for one task: a measurement over a failure (a failed run's 0 must not
    beat a real, negative FENSE), then the higher score, then the machine name (a stable tie-break)."""
    return max((a, b), key=lambda t: (not t.failed, t.score, t.machine))


def merge_machines(results: Iterable[Results]) -> list[Entry]:
    """Group results by (submission sha256, base track) and keep each task's best result.

    Raises:
        DataError: files of one group disagree on a task's metric or on whether it is hidden.
    """
    groups: dict[tuple[str, str], list[Results]] = defaultdict(list)
    for r in results:
        groups[(r.sha256, base_track(r.track))].append(r)
    entries, conflicts = [], []
    for (sha, track), members in sorted(groups.items()):
        best: dict[str, TaskResult] = {}
        origin: dict[str, str] = {}
        for r in sorted(members, key=lambda r: (r.source, r.machine)):
            for t in r.tasks:
                old = best.get(t.task)
                if old is not None and (old.metric, old.hidden) != (t.metric, t.hidden):
                    conflicts.append(
                        f"task {t.task!r} of {sha[:12]} on track {track}: {origin[t.task]} has metric "
                        f"{old.metric}, hidden={old.hidden}; {r.source} has {t.metric}, hidden={t.hidden}"
                    )
                    continue
                best[t.task] = t if old is None else _best(old, t)
                origin.setdefault(t.task, r.source)
        names = sorted({r.submission for r in members})
        if len(names) > 1:
            logger.warning("submission %s is named %s in different files; showing %r", sha[:12], names, names[0])
        tasks = tuple(sorted(best.values(), key=lambda t: (t.hidden, t.task)))
        entries.append(Entry(
            submission=names[0], sha256=sha, track=track, tasks=tasks,
            machines=tuple(sorted({r.machine for r in members})),
            sources=tuple(sorted({r.source for r in members})),
        ))
    if conflicts:
        raise DataError("results files of one submission disagree", reasons=conflicts)
    return entries


def _mean(values: list[float]) -> float | None:
    return math.fsum(values) / len(values) if values else None


def track_score(tasks: Iterable[TaskResult], expected: Iterable[tuple[str, bool]] | None = None,
                *, two_halves: bool = True) -> TrackScore:
    """The challenge score of one submission on one track.

    Args:
        tasks: one result per task (already the maximum over machines, see `merge_machines`).
        expected: (task, hidden) pairs the track should have; those absent from ``tasks`` count as 0
            in a half that has other results. A half with no results at all is left out (partial).
        two_halves: the track has a hidden half (A, B). Without one (demo and custom tracks) a score from
            the public tasks alone is complete, not partial.

    Returns:
        ``(mean(public) + mean(hidden)) / 2``, or the mean of the half that exists (``partial``).
    """
    tasks = list(tasks)
    have = {t.task for t in tasks}
    halves: dict[bool, list[float]] = {False: [], True: []}
    for t in tasks:
        halves[t.hidden].append(0.0 if t.failed else t.score)
    missing = []
    for name, hidden in sorted(set(expected or ()), key=lambda x: (x[1], x[0])):
        if name not in have and halves[hidden]:
            halves[hidden].append(0.0)
            missing.append(name)
    public, hidden = _mean(halves[False]), _mean(halves[True])
    notes = []
    if public is None and hidden is None:
        value, partial = 0.0, True
        notes.append("no task results")
    elif hidden is None and not two_halves:
        value, partial = public, False
    elif public is None or hidden is None:
        value, partial = (hidden if public is None else public), True
        notes.append(f"partial: no {'public' if public is None else 'hidden'} tasks, score is the mean of the "
                     f"{'hidden' if public is None else 'public'} ones")
    else:
        value, partial = (public + hidden) / 2, False
    failed = tuple(t.task for t in tasks if t.failed)
    if failed:
        notes.append(f"failed (counted as 0): {', '.join(failed)}")
    if missing:
        notes.append(f"missing (counted as 0): {', '.join(missing)}")
    return TrackScore(value, public, hidden, partial, failed, tuple(missing), tuple(notes))


def _track_key(track: str) -> tuple[int, str]:
    return (TRACK_ORDER.index(track) if track in TRACK_ORDER else len(TRACK_ORDER), track)


def leaderboard(results: Iterable[Results]) -> list[Row]:
    """Rank submissions per base track, best first; equal scores share a rank.

    Args:
        results: parsed results documents (any mix of submissions, tracks and machines).

    Returns:
        Rows ordered by track (A, B, then others), then rank, then submission name.

    Raises:
        DataError: see `merge_machines`.
    """
    by_track: dict[str, list[Entry]] = defaultdict(list)
    for entry in merge_machines(results):
        by_track[entry.track].append(entry)
    rows = []
    for track in sorted(by_track, key=_track_key):
        entries = by_track[track]
        expected = tuple(sorted({(t.task, t.hidden) for e in entries for t in e.tasks}, key=lambda x: (x[1], x[0])))
        scored = [(track_score(e.tasks, expected, two_halves=track in TWO_HALF_TRACKS), e) for e in entries]
        scored.sort(key=lambda se: (-round(se[0].score, TIE_DIGITS), se[1].submission, se[1].sha256))
        rank, previous = 0, None
        for position, (result, entry) in enumerate(scored, start=1):
            key = round(result.score, TIE_DIGITS)
            if key != previous:
                rank, previous = position, key
            rows.append(Row(rank, entry, result, expected))
    return rows
