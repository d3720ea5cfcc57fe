"""``xares-eval run``: submissions on a track, from submission.tar to results.json (several: in packs)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from evaluator.errors import ConfigError, first_line

TRACKS = ("A", "A-hidden", "B", "B-hidden", "demo-a", "demo-b")


@click.command(
    epilog="""\b
Examples:
  xares-eval run submission.tar --track A
  xares-eval run team1.tar team2.tar team3.tar --track A --pack auto
  xares-eval run submission.tar --track B-hidden --hidden-config /secure/hidden.yaml
  xares-eval run submission.tar --train-config train_task1_config.yaml \\
      --eval-config eval_task1_config.yaml --max-steps 2000
  xares-eval run submission.tar --track demo-a --data-home demo_out/data \\
      --decoder demo_out/smoke-decoder --max-steps 600

\b
Outputs go under --out, in folders named by a hash of everything that shapes them (submission
digest, configs, decoder, seed, steps): rerunning after a kill resumes; a changed setting never
reuses an old checkpoint or score. Several submissions with --pack train their
decoders together over one frozen decoder, into the same folders as separate runs.""",
)
@click.argument("submissions", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--track", type=click.Choice(TRACKS), default=None,
              help="Track to run. Not needed with --train-config/--eval-config.")
@click.option("--train-config", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="XARES-LLM training YAML (train_data + top-level fields such as max_steps, learning_rate).")
@click.option("--eval-config", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="XARES-LLM evaluation YAML (requires --train-config unless --track names the decoder's track).")
@click.option("--decoder", default=None, metavar="NAME|PATH",
              help="Decoder by hub name (read from the local HF cache) or local folder "
                   "[default: the track's, HuggingFaceTB/SmolLM2-135M].")
@click.option("--max-steps", type=click.IntRange(min=1), default=None,
              help="Training steps [default: the track's max_steps, 100000 for A and B].")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("out"), show_default=True,
              help="Output root (features, checkpoints, predictions, results).")
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True,
              help="fp32 is deterministic (the protocol; bit-identical reruns on the same machine); "
                   "bf16 is the fast mode (bf16 weights and autocast).")
@click.option("--device", default="auto", show_default=True, metavar="auto|cpu|cuda|cuda:N",
              help="Where the decoder trains and generates (auto: the first GPU torch sees, else the CPU). "
                   "Checkpoints move between devices: a run started on a GPU resumes on a CPU.")
@click.option("--compile", "compile_mode", type=click.Choice(["auto", "on", "off"]), default="auto",
              show_default=True,
              help="Capture the decoder as CUDA graphs (auto: on CUDA only). fp32 replays the eager kernels "
                   "(same numbers); bf16 lets the compiler fuse them too. off: plain eager, to debug.")
@click.option("--feature-dtype", type=click.Choice(["auto", "float16", "bfloat16", "float32"]), default="auto",
              show_default=True,
              help="Storage dtype of the features. auto: float16 when the probe's measured range fits it with "
                   "room to spare, else float32 (and a split that still overflows float16 is redone in float32).")
@click.option("--seed", type=int, default=None, help="Training seed [default: the track's, 42].")
@click.option("--machine", default=None, help="Machine name written into results.json [default: host name].")
@click.option("--data-home", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Data cache [default: $XARES_DATA_HOME or ./xares_data].")
@click.option("--hidden-config", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Organizer's hidden-track YAML [default: $XARES_HIDDEN_CONFIG]; hidden tracks only.")
@click.option("--offline", is_flag=True, help="Never download shards; fail listing the missing files.")
@click.option("--limit-clips", type=click.IntRange(min=1), default=None,
              help="At most N clips per task and split (smoke runs; scores are not comparable).")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Torch CPU threads [default: the cores this process may use (affinity, cgroup quota)].")
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=500, show_default=True,
              help="Training steps between checkpoints (a killed run resumes from the last one).")
@click.option("--eval-batch-size", type=click.IntRange(min=1), default=None,
              help="Clips decoded together [default: 32 on a CPU, 256 on a GPU]; greedy answers do not depend on it.")
@click.option("--memory-mb", type=click.IntRange(min=64), default=None,
              help="Encoder memory cap in MiB [default: the manifest's resources.memory_mb].")
@click.option("--gpu/--no-gpu", default=False, show_default=True,
              help="Give the encoder a GPU (fails with a message when none is usable).")
@click.option("--spot-check", type=click.FloatRange(0, 1), default=0.02, show_default=True,
              help="Share of one eval task's clips re-extracted and compared with the store (0 = off).")
@click.option("--time-limit", type=click.FloatRange(min=0.01), default=10.0, show_default=True,
              help="Time budget of the probe and of each extraction: wall-clock seconds per audio-second given to "
                   "the encoder, on top of --time-floor; the encoder is killed when it runs out.")
@click.option("--time-floor", type=click.FloatRange(min=1), default=300.0, show_default=True,
              help="Seconds every time budget starts with.")
@click.option("--pack", "pack", default="1", show_default=True, metavar="auto|K",
              help="Train (and decode) up to K submissions' decoders together over one frozen decoder; auto: as "
                   "many as fit the device's memory. Each gets the result of its own run; a failed one is reported "
                   "and the others go on.")
@click.option("--sign-key", type=click.Path(dir_okay=False, path_type=Path), default=None, envvar="XARES_SIGN_KEY",
              help="Organizer's private key (`xares-eval keygen`): each results.json gets a signed receipt.json "
                   "[default: $XARES_SIGN_KEY].")
@click.option("--site/--no-site", default=True, show_default=True,
              help="Write the results site of every run under --out to OUT/site/index.html.")
@click.option("--quiet", is_flag=True, help="No progress bars (they are off anyway when stdout is not a terminal).")
def run(submissions: tuple[Path, ...], track: str | None, train_config: Path | None, eval_config: Path | None,
        decoder: str | None, max_steps: int | None, out: Path, precision: str, device: str, compile_mode: str,
        feature_dtype: str, seed: int | None,
        machine: str | None, data_home: Path | None, hidden_config: Path | None, offline: bool,
        limit_clips: int | None, threads: int | None, checkpoint_every: int, eval_batch_size: int | None, memory_mb: int | None, gpu: bool, spot_check: float,
        time_limit: float, time_floor: float, pack: str, sign_key: Path | None, site: bool, quiet: bool) -> None:
    """Evaluate SUBMISSIONS (submission.tar files) on a track and write a results.json for each.

    Validates the submission, extracts features in the sandbox (once per clip), trains the projector
    and LoRA decoder of the track, generates an answer per test clip and scores it. A task that fails
    is reported and scored 0 ("failed"); the run goes on. With several submissions, one that fails is
    reported in one line and the others go on; the exit code is then that of the first failure.
    """
    from evaluator.cores import settle_openmp

    settle_openmp()  # before anything imports torch
    from evaluator.runner import RunOptions, resolve_track, run_submission, run_submissions
    from evaluator.sandbox.base import TimeBudget

    if track is None and not (train_config or eval_config):
        raise ConfigError("give --track NAME or --train-config/--eval-config (XARES-LLM YAML)")
    if eval_config and not train_config and track is None:
        raise ConfigError("--eval-config needs --train-config (or --track naming the decoder's track)")
    if sign_key is not None:  # a wrong key fails now, not after hours of training
        from evaluator.receipts import load_private_key

        load_private_key(sign_key)
    spec = resolve_track(track, train_config=train_config, eval_config=eval_config, data_home=data_home,
                         hidden_config=hidden_config)
    train_spec = None
    if eval_config and not train_config:
        train_spec = resolve_track(track, data_home=data_home, hidden_config=hidden_config)
    opts = RunOptions(out=out, decoder=decoder, max_steps=max_steps, precision=precision, seed=seed,
                      device=device, compile=compile_mode, feature_dtype=feature_dtype,
                      time_budget=TimeBudget(seconds_per_audio_second=time_limit, floor_seconds=time_floor),
                      data_home=data_home, hidden_config=hidden_config, download=not offline,
                      limit_clips=limit_clips, threads=threads, checkpoint_every=checkpoint_every, eval_batch_size=eval_batch_size, memory_mb=memory_mb, gpu=gpu, spot_check=spot_check,
                      progress=not quiet, sign_key=sign_key,
                      **({"machine": machine} if machine else {}))
    size = parse_pack(pack)
    if len(submissions) == 1:
        outcomes = [run_submission(submissions[0], spec, opts, echo=click.echo, train_track=train_spec)]
        failures = []
    else:
        batch = run_submissions(list(submissions), spec, opts, pack=size, echo=click.echo, train_track=train_spec)
        outcomes = [b.outcome for b in batch if b.outcome is not None]
        failures = [b for b in batch if b.error is not None]
    from evaluator.cli.leaderboard import build_table, render_md
    from evaluator.scoring import leaderboard, parse_results

    if outcomes:
        header, body = build_table(leaderboard([parse_results(o.document) for o in outcomes]))
        click.echo("")
        click.echo(render_md(header, body))
        for outcome in outcomes:
            click.echo(f"Results: {outcome.results_path}")
        if site:
            from evaluator.report import write_site

            click.echo(f"Site: {write_site(out)}")
    if failures:
        for f in failures:
            click.echo(f"error: {f.archive.name}: {first_line(f.error)}", err=True)
        click.echo(f"error: {len(failures)} of {len(submissions)} submissions failed", err=True)
        sys.exit(failures[0].error.exit_code)


def parse_pack(value: str) -> int | None:
    """--pack: 'auto' (None) or a positive count."""
    if value.strip().lower() == "auto":
        return None
    try:
        size = int(value)
    except ValueError:
        size = 0
    if size < 1:
        raise ConfigError(f"--pack must be 'auto' or a positive number of submissions, got {value!r}")
    return size

