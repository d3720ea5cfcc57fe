"""``xares-eval tasks`` (every task of every track, its metric and data status) and ``xares-eval demo-data``.

    xares-eval tasks
    xares-eval tasks --track B --data-home /data/xares --format tsv
    xares-eval tasks --hidden-config /secure/hidden.yaml
    xares-eval demo-data --out xares_data --track all
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from evaluator.data import cache
from evaluator.data import tasks as registry
from evaluator.data.specs import TaskSpec, TrackSpec

COLUMNS = ("track", "task", "name", "metric", "train data", "test data")
NO_HIDDEN = "hidden-config not given"


def _split_status(task: TaskSpec, split: str, home: Path, demo: bool) -> str:
    if not task.shards(split):
        return "(eval only)" if split == "train" else "(train only)"
    status = cache.shard_files(task, split, data_home=home)
    if demo and not any(f.present for f in status.files):
        return "not generated (xares-eval demo-data)"
    return status.describe()


def _track_rows(track: TrackSpec, home: Path) -> list[dict[str, str]]:
    demo = track.name in registry.DEMO_TRACKS
    rows = []
    for t in track.tasks:
        metric = t.metric or "(trained only)"
        if t.metric_args:
            metric += " " + ",".join(f"{k}={v}" for k, v in t.metric_args.items())
        train = _split_status(t, "train", home, demo)
        if not t.train_shards and track.decoder_track != track.name:
            train = f"(scored by the Track {track.decoder_track} decoder)"
        rows.append({
            "track": track.name, "task": t.id, "name": t.name, "metric": metric,
            "train data": train, "test data": _split_status(t, "test", home, demo),
        })
    return rows


def task_rows(names: list[str], *, hidden_config: Path | None, data_home: Path | None) -> list[dict[str, str]]:
    """One row per task of the named tracks; hidden tracks without a config list their public names."""
    home = cache.data_home(data_home)
    configured = registry.configured_hidden_tracks(hidden_config)
    rows: list[dict[str, str]] = []
    for name in names:
        if name in registry.HIDDEN_TRACKS and name not in configured:
            given = registry.hidden_config_path(hidden_config)
            status = NO_HIDDEN if given is None else f"not in {given}"
            for h in registry.PUBLIC_HIDDEN_TASKS[name]:
                rows.append({"track": name, "task": h.id, "name": h.name, "metric": h.metric,
                             "train data": status, "test data": status})
            continue
        track = registry.get_track(name, hidden_config=hidden_config, data_home=data_home)
        rows.extend(_track_rows(track, home))
    return rows


def _render_table(rows: list[dict[str, str]], home: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:  # piped or captured: do not squeeze the table into 80 columns
        console = Console(width=160)
    shown = [c for c in COLUMNS if c != "name"]
    table = Table(title=f"XARES-LLM tasks (data home: {home})", show_lines=False)
    for col in shown:
        table.add_column(col, no_wrap=col in ("track", "task"), overflow="fold")
    last = None
    for row in rows:
        if last is not None and row["track"] != last:
            table.add_section()
        last = row["track"]
        table.add_row(*(row[c] for c in shown))
    console.print(table)


@click.command(
    epilog="""\b
Examples:
  xares-eval tasks
  xares-eval tasks --track A --format tsv
  xares-eval tasks --hidden-config /secure/hidden.yaml --data-home /data/xares_data
""",
)
@click.option("--track", "track", type=click.Choice(["all", *registry.list_tracks()]), default="all",
              show_default=True, help="Only this track.")
@click.option("--hidden-config", type=click.Path(dir_okay=False, path_type=Path), envvar=registry.HIDDEN_CONFIG_ENV,
              help=f"Organizer's hidden-track YAML (env {registry.HIDDEN_CONFIG_ENV}); without it hidden tasks are "
                   "listed by their public names only.")
@click.option("--data-home", type=click.Path(file_okay=False, path_type=Path), envvar=cache.DATA_HOME_ENV,
              help=f"Data cache folder (env {cache.DATA_HOME_ENV}; default ./xares_data). Nothing is downloaded.")
@click.option("--format", "fmt", type=click.Choice(["table", "tsv", "json"]), default="table", show_default=True,
              help="Output format.")
def tasks(track: str, hidden_config: Path | None, data_home: Path | None, fmt: str) -> None:
    """List every task of every track with its metric and data status.

    Data status is read from the data cache without downloading: "present", "missing N of M shard
    files", or "hidden-config not given" for organizer-only tracks.
    """
    names = list(registry.list_tracks()) if track == "all" else [track]
    rows = task_rows(names, hidden_config=hidden_config, data_home=data_home)
    if fmt == "json":
        click.echo(json.dumps(rows, indent=2))
    elif fmt == "tsv":
        click.echo("\t".join(COLUMNS))
        for row in rows:
            click.echo("\t".join(row[c] for c in COLUMNS))
    else:
        _render_table(rows, cache.data_home(data_home))


@click.command(
    "demo-data",
    epilog="""\b
Examples:
  xares-eval demo-data                      # both demo tracks under ./xares_data
  xares-eval demo-data --out /tmp/demo --track demo-a
  xares-eval run submission.tar --track demo-a --data-home /tmp/demo --offline --decoder DIR
""",
)
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), envvar=cache.DATA_HOME_ENV,
              help=f"Data home to write into: <OUT>/demo-a, <OUT>/demo-b (default ${cache.DATA_HOME_ENV} or ./xares_data).")
@click.option("--track", "track", type=click.Choice(["all", *registry.DEMO_TRACKS]), default="all", show_default=True,
              help="Which demo track to generate.")
@click.option("--seed", type=int, default=0, show_default=True, help="Drawing seed; the same seed gives the same bytes.")
def demo_data(out: Path | None, track: str, seed: int) -> None:
    """Generate the offline demo tracks (espeak-ng and sox; seconds, no network).

    Writes webdataset shards and XARES-LLM train/eval YAMLs that `xares-eval run --track demo-a`
    (with the same --data-home) reads through the same code path as real data.
    """
    from evaluator.data.demo import generate_demo

    home = cache.data_home(out)
    for name in list(registry.DEMO_TRACKS) if track == "all" else [track]:
        click.echo(f"Generating {name} ...")
        t0 = time.monotonic()
        train_yaml, eval_yaml = generate_demo(name, home / name, seed)
        spec = registry.get_track(name, data_home=home)
        click.echo(f"  - {len(spec.tasks)} tasks: {', '.join(f'{t.id} ({t.metric})' for t in spec.tasks)}")
        click.echo(f"  - {train_yaml}")
        click.echo(f"  - {eval_yaml}")
        click.echo(f"  - done in {time.monotonic() - t0:.1f} s")
    click.echo(f"Demo data ready under {home}")
