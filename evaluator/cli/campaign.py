"""``xares-eval campaign``: many submissions on several tracks in one command; ``campaign status DIR``."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from evaluator.errors import ConfigError


@click.command(
    epilog="""\b
Examples:
  xares-eval campaign submissions/*.tar --tracks A,A-hidden,B,B-hidden --out camp/ --pack auto
  xares-eval campaign submissions/*.tar --out camp/ --jobs 2
  xares-eval campaign submissions/*.tar --out /shared/camp/ --ray auto
  xares-eval campaign status camp/

\b
The campaign is a graph of jobs: extract/<track>/<sub>, train/<decoder track>/<subs>, score/<track>/<sub>.
The hidden tracks need the organizer's hidden config (--hidden-config FILE or $XARES_HIDDEN_CONFIG).
Everything lands in OUT: runs/ (the same hash-keyed folders as `xares-eval run`), logs/ (one log per job),
campaign.json (one record per job), leaderboard.md/.tsv/.html. Rerunning the command skips what is done.
With --ray, OUT, the submissions, --data-home and the decoder must be on a filesystem every node sees.""",
)
@click.argument("submissions", nargs=-1, required=True)
@click.option("--tracks", default="A,A-hidden,B,B-hidden", show_default=True,
              help="Comma-separated tracks; a track scored with another's decoder runs after it.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("campaign"),
              show_default=True, help="The campaign folder.")
@click.option("--pack", default="1", show_default=True, metavar="auto|K",
              help="Decoders trained together per pack (see `xares-eval run --pack`).")
@click.option("--jobs", type=click.IntRange(min=1), default=1, show_default=True,
              help="Jobs at once on this machine, each in its own worker process (1: in this process).")
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
              help="Run the jobs as Ray tasks: on the cluster at ADDRESS (auto, host:port) or, without one, a "
                   "Ray instance started here. Needs pip install 'xares-eval[cluster]'.")
@click.option("--gpu-share", type=click.FloatRange(min=0, max=1, min_open=True), default=0.25, show_default=True,
              help="With --ray on GPU nodes: GPUs each train and score job asks for (0.25: four share a GPU).")
@click.option("--retries", type=click.IntRange(min=0), default=3, show_default=True,
              help="With --ray: reruns of a job whose worker or node was lost.")
@click.option("--decoder", default=None, metavar="NAME|PATH", help="Decoder [default: the track's].")
@click.option("--max-steps", type=click.IntRange(min=1), default=None, help="Training steps [default: the track's].")
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True)
@click.option("--device", default="auto", show_default=True, metavar="auto|cpu|cuda|cuda:N")
@click.option("--data-home", type=click.Path(file_okay=False, path_type=Path), default=None)
@click.option("--hidden-config", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None)
@click.option("--offline", is_flag=True, help="Never download shards.")
@click.option("--limit-clips", type=click.IntRange(min=1), default=None, help="At most N clips per task split (smoke runs).")
@click.option("--threads", type=click.IntRange(min=1), default=None)
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=150, show_default=True,
              help="Longest answer generated (150: the protocol's; smaller for smoke runs).")
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=500, show_default=True,
              help="Training steps between checkpoints (a killed campaign resumes from the last one).")
@click.option("--machine", default=None, help="Machine name written into results.json [default: host name].")
@click.option("--sign-key", type=click.Path(dir_okay=False, path_type=Path), default=None, envvar="XARES_SIGN_KEY",
              help="Organizer's private key: each results.json gets a signed receipt.json [default: $XARES_SIGN_KEY].")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def campaign(submissions: tuple[str, ...], tracks: str, out: Path, pack: str, jobs: int, ray_address: str | None,
             gpu_share: float, retries: int, decoder: str | None,
             max_steps: int | None, precision: str, device: str, data_home: Path | None,
             hidden_config: Path | None, offline: bool, limit_clips: int | None, threads: int | None,
             max_new_tokens: int, checkpoint_every: int, machine: str | None, sign_key: Path | None,
             quiet: bool) -> None:
    """Evaluate SUBMISSIONS (submission.tar files) on every track of --tracks and write the leaderboard.

    `xares-eval campaign status DIR` prints the job table of a campaign folder, also while it runs.
    """
    if submissions[0] == "status":
        if len(submissions) != 2:
            raise ConfigError("usage: xares-eval campaign status DIR")
        return _status(Path(submissions[1]))
    paths = [Path(s) for s in submissions]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ConfigError(f"no such submission file: {', '.join(missing)}")
    if ray_address is not None and jobs != 1:
        raise ConfigError("--jobs is for this machine; with --ray the cluster's resources decide what runs at once")
    if sign_key is not None:  # a wrong key fails now, not after the campaign
        from evaluator.receipts import load_private_key

        load_private_key(sign_key)
        sign_key = sign_key.resolve()
    from evaluator.cores import settle_openmp

    settle_openmp()
    from evaluator.campaign import LocalExecutor, RayExecutor, StageResources, run_campaign, status_table
    from evaluator.cli.leaderboard import render_md
    from evaluator.cli.run import parse_pack
    from evaluator.runner import RunOptions, resolve_track

    size = parse_pack(pack)
    names = [t.strip() for t in tracks.split(",") if t.strip()]
    specs = [resolve_track(n, data_home=data_home, hidden_config=hidden_config) for n in names]
    opts = RunOptions(decoder=decoder, max_steps=max_steps, precision=precision, device=device, data_home=data_home,
                      hidden_config=hidden_config, download=not offline, limit_clips=limit_clips, threads=threads, max_new_tokens=max_new_tokens,
                      checkpoint_every=checkpoint_every, progress=not quiet, sign_key=sign_key, **({"machine": machine} if machine else {}))
    if ray_address is not None:
        executor = RayExecutor(None if ray_address == "local" else ray_address,
                               StageResources(gpu_share=gpu_share, retries=retries))
    else:
        executor = LocalExecutor(jobs=jobs)
    records = run_campaign(paths, specs, out, opts, pack=size, executor=executor, echo=click.echo)
    click.echo("")
    click.echo(render_md(*status_table(records)))
    click.echo(f"Leaderboard: {out / 'leaderboard.md'} (also .tsv, .html)")
    failed = [r for r in records if r.status != "done" or r.failed]
    if failed:
        click.echo(f"error: {len(failed)} of {len(records)} jobs failed (see the table)", err=True)
        sys.exit(1)


def _status(out: Path) -> None:
    from evaluator.campaign import read_state, status_table
    from evaluator.cli.leaderboard import render_md

    records = read_state(out)
    click.echo(render_md(*status_table(records)))
    counts = {}
    for r in records:
        counts[r.status] = counts.get(r.status, 0) + 1
    click.echo(", ".join(f"{n} {status}" for status, n in sorted(counts.items())))
