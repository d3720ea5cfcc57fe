"""A campaign: many submissions on several tracks in one command, resumable, with a status file and a leaderboard.

    xares-eval campaign subs/*.tar --tracks A,A-hidden,B,B-hidden --out camp/
    xares-eval campaign status camp/

Tracks run in dependency order (a track scored with another track's decoder, B-hidden, after that track).
Each track is one `run_submissions` call over every submission: features, decoders (packed with
``--pack``) and scores land in ``<out>/runs`` under the same hash-keyed folders as `xares-eval run`, so a
rerun of the command finds finished work there and skips it. ``<out>/campaign.json`` holds one record per
(submission, track) — waiting, running, done or failed with its reason — rewritten atomically at every
change, so `status` can read it while the campaign runs; a record left "running" by a process that is
gone reads as "interrupted". When every track is through, ``leaderboard.{md,tsv,html}`` are written, with
the failed submissions and their reasons below the ranking.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from evaluator.errors import ConfigError, first_line
from evaluator.fileio import atomic_write_text

STATE_FILE = "campaign.json"
STATE_FORMAT = "xares-eval/campaign/1"
RUNS_DIR = "runs"


@dataclass
class JobRecord:
    """One submission on one track."""

    submission: str  # the archive's file name
    track: str
    status: str = "waiting"  # waiting | running | done | failed
    reason: str = ""  # why it failed
    seconds: float | None = None  # wall time of the track's batch it ran in
    results: str = ""  # results.json, relative to the campaign folder
    pid: int | None = None  # the process running it (status tells a dead one apart)


def track_order(tracks: Sequence) -> list:
    """Tracks with every decoder track before the tracks scored with its decoder (B before B-hidden)."""
    names = {t.name for t in tracks}
    first = [t for t in tracks if t.decoder_track == t.name or t.decoder_track not in names]
    return first + [t for t in tracks if t not in first]


class Campaign:
    """The state of a campaign folder: its job records, saved after every change."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.path = self.out / STATE_FILE
        self.records: dict[tuple[str, str], JobRecord] = {}
        self.settings: dict = {}
        if self.path.exists():
            self.records = {(r.submission, r.track): r for r in read_state(self.out)}
            self.settings = json.loads(self.path.read_text()).get("settings", {})

    def plan(self, submissions: Sequence[Path], tracks: Sequence[str], settings: dict) -> None:
        """Records for every (submission, track); finished ones are kept unless the settings changed."""
        names = [Path(s).name for s in submissions]
        if len(set(names)) != len(names):
            raise ConfigError("two submissions share a file name; rename one (the leaderboard tells them apart by it)")
        if settings != self.settings:  # other options: rerun all (the runs reuse what their keys allow)
            self.records = {}
        self.settings = settings
        for track in tracks:
            for name in names:
                record = self.records.get((name, track))
                if record is None or record.status != "done":
                    self.records[name, track] = JobRecord(name, track)
        self.save()

    def set(self, submission: str, track: str, **changes) -> None:
        record = self.records[submission, track]
        for key, value in changes.items():
            setattr(record, key, value)
        self.save()

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        doc = {"format": STATE_FORMAT, "settings": self.settings,
               "jobs": [dataclasses.asdict(r) for r in self.records.values()]}
        atomic_write_text(self.path, json.dumps(doc, indent=2) + "\n")


def read_state(out: Path) -> list[JobRecord]:
    """The job records of a campaign folder; a "running" job whose process is gone reads "interrupted".

    Raises:
        ConfigError: the folder holds no campaign, or its state file is not one.
    """
    path = Path(out) / STATE_FILE
    try:
        doc = json.loads(path.read_text())
        if doc.get("format") != STATE_FORMAT:
            raise ValueError(f"format {doc.get('format')!r}")
        records = [JobRecord(**job) for job in doc["jobs"]]
    except FileNotFoundError:
        raise ConfigError(f"{out} is not a campaign folder (no {STATE_FILE})") from None
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{path} is not a campaign state file: {first_line(e)}") from e
    for r in records:
        if r.status == "running" and not _alive(r.pid):
            r.status = "interrupted"
    return records


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def run_campaign(submissions: Sequence[Path], tracks: Sequence, out: Path, opts, *, pack: int | None,
                 echo: Callable[[str], None] = print) -> list[JobRecord]:
    """Run every submission on every track (in dependency order) and write the leaderboard.

    Args:
        submissions: submission.tar files (their names must differ).
        tracks: `TrackSpec`s to run.
        out: the campaign folder; ``<out>/runs`` is the runs' output root.
        opts: `RunOptions` (``out`` is replaced by ``<out>/runs``).
        pack: decoders per pack (None: as many as fit; 1: one at a time).

    Returns:
        The job records, after the campaign.
    """
    from evaluator.runner import run_submissions

    campaign = Campaign(out)
    ordered = track_order(tracks)
    opts = dataclasses.replace(opts, out=Path(out) / RUNS_DIR)
    settings = json.loads(json.dumps({k: str(v) for k, v in dataclasses.asdict(opts).items()
                                      if k not in ("progress", "machine")}))
    campaign.plan(submissions, [t.name for t in ordered], settings)
    by_name = {t.name: t for t in tracks}
    for track in ordered:
        todo = [s for s in submissions if campaign.records[Path(s).name, track.name].status != "done"
                or not (Path(out) / campaign.records[Path(s).name, track.name].results).is_file()]
        if not todo:
            echo(f"== {track.name}: every submission done before")
            continue
        echo(f"== {track.name}: {len(todo)} submission{'s' if len(todo) != 1 else ''}")
        for s in todo:
            campaign.set(Path(s).name, track.name, status="running", reason="", pid=os.getpid())
        t0 = time.monotonic()
        train_track = by_name.get(track.decoder_track) if track.decoder_track != track.name else None
        outcomes = run_submissions(list(todo), track, opts, pack=pack, echo=echo, train_track=train_track)
        seconds = round(time.monotonic() - t0, 1)
        for archive, outcome in zip(todo, outcomes):
            name = Path(archive).name
            if outcome.error is not None:
                campaign.set(name, track.name, status="failed", reason=first_line(outcome.error), seconds=seconds,
                             pid=None)
            else:
                results = outcome.outcome.results_path.relative_to(Path(out))
                campaign.set(name, track.name, status="done", results=str(results), seconds=seconds, pid=None)
    write_leaderboard(out, list(campaign.records.values()))
    return list(campaign.records.values())


def write_leaderboard(out: Path, records: Sequence[JobRecord]) -> dict[str, Path]:
    """leaderboard.md, .tsv and .html of the finished jobs, with the failed ones and their reasons after."""
    from evaluator.cli.leaderboard import build_table, render_html, render_md, render_tsv
    from evaluator.scoring import leaderboard, load_results

    done = [load_results(Path(out) / r.results) for r in records if r.status == "done"]
    header, body = build_table(leaderboard(done)) if done else (["rank", "submission"], [])
    failed = [[r.submission, r.track, r.reason] for r in records if r.status != "done"]
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
    rows = [[r.submission, r.track, r.status, "" if r.seconds is None else f"{r.seconds:.0f} s", r.reason]
            for r in records]
    return ["submission", "track", "status", "time", "reason"], rows
