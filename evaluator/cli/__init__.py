"""Command-line entry points: ``xares-submit`` (participants) and ``xares-eval`` (organizers).

Each subcommand lives in its own module and is imported only when invoked, so ``--help`` stays fast
and a participant's ``validate`` never imports the training stack.

Errors: a `XaresError` becomes one line on stderr and its exit code (1 invalid input, 2 usage or
config, 3 host environment); Ctrl-C exits 130 with one line (rerunning resumes); anything else is our
bug and exits 70 (traceback with ``--debug``).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys
import traceback
import warnings

import click

from evaluator.errors import XaresError

INTERNAL_ERROR_EXIT = 70  # EX_SOFTWARE
INTERRUPTED_EXIT = 130  # 128 + SIGINT, what a shell reports for a process stopped by Ctrl-C
INTERRUPTED_MESSAGE = "interrupted; rerun the same command to resume"

SUBMIT_COMMANDS = {
    "init": "evaluator.cli.submit:init",
    "build": "evaluator.cli.submit:build",
    "validate": "evaluator.cli.submit:validate",
}
EVAL_COMMANDS = {
    "run": "evaluator.cli.run:run",
    "campaign": "evaluator.cli.campaign:campaign",
    "extract": "evaluator.cli.extract:extract",
    "tasks": "evaluator.cli.tasks:tasks",
    "demo-data": "evaluator.cli.tasks:demo_data",
    "leaderboard": "evaluator.cli.leaderboard:leaderboard",
    "report": "evaluator.cli.report:report",
    "validate": "evaluator.cli.submit:validate",
    "demo": "evaluator.cli.demo:demo",
    "cleanup": "evaluator.cli.cleanup:cleanup",
    "keygen": "evaluator.cli.receipts:keygen",
    "verify": "evaluator.cli.receipts:verify",
}


def _available(table: dict[str, str]) -> list[str]:
    names = []
    for name, target in table.items():
        module = target.split(":")[0]
        if importlib.util.find_spec(module) is not None:
            names.append(name)
    return names


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use and whose errors stay one line."""

    def __init__(self, *args, lazy: dict[str, str], **kwargs):
        super().__init__(*args, **kwargs)
        self._lazy = lazy

    def list_commands(self, ctx):
        return sorted(_available(self._lazy))

    def get_command(self, ctx, name):
        target = self._lazy.get(name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name == module_name:
                return None
            raise
        return getattr(module, attr)

    def invoke(self, ctx):
        debug = bool(ctx.params.get("debug"))
        try:
            return super().invoke(ctx)
        except XaresError as e:
            if debug:
                raise
            _report_user_error(e)
            ctx.exit(e.exit_code)
        except (click.exceptions.Exit, click.ClickException):
            raise
        except (KeyboardInterrupt, click.Abort):  # not "Aborted!" and exit 1: 1 means an invalid submission
            if debug:
                traceback.print_exc()
            click.echo(INTERRUPTED_MESSAGE, err=True)
            ctx.exit(INTERRUPTED_EXIT)
        except Exception as e:  # our bug, not the user's
            if debug:
                raise
            logging.getLogger("evaluator").debug("internal error", exc_info=True)
            click.echo(
                f"internal error: {type(e).__name__}: {e} (a bug in xares-eval; rerun with --debug for the "
                "traceback and report it)",
                err=True,
            )
            ctx.exit(INTERNAL_ERROR_EXIT)


def _report_user_error(e: XaresError) -> None:
    click.echo(f"error: {e}", err=True)
    for reason in e.reasons:
        click.echo(f"  - {reason}", err=True)


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    if verbose == 0:  # quiet by default: our own progress bars only, no library chatter
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module="torch")
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # the console keeps its level even while a run lowers the evaluator logger's to INFO for its run.log
    for handler in logging.getLogger().handlers:
        handler.setLevel(level)


_common = [
    click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug). Logs go to stderr."),
    click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors."),
]


def _group(fn):
    for opt in reversed(_common):
        fn = opt(fn)
    return fn


@click.group(cls=LazyGroup, lazy=SUBMIT_COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@_group
def submit_cli(verbose: int, debug: bool) -> None:
    """Package and check an audio encoder for the XARES-LLM challenge.

    \b
    Typical use:
      xares-submit init my_encoder --kind onnx
      xares-submit build my_encoder -o submission.tar
      xares-submit validate submission.tar
    """
    _setup_logging(verbose)


@click.group(cls=LazyGroup, lazy=EVAL_COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@_group
def eval_cli(verbose: int, debug: bool) -> None:
    """Evaluate encoder submissions: sandboxed extraction, decoder training, scoring, leaderboard.

    \b
    Typical use:
      xares-eval tasks
      xares-eval demo-data --out xares_data --track demo-a
      xares-eval run submission.tar --track demo-a --offline --decoder DIR
      xares-eval leaderboard out/*/*/results.json --format md

    \b
    `run` needs the track's data first (demo-data, or shards it downloads
    without --offline) and a decoder: a folder written by save_pretrained
    (--decoder DIR) or HuggingFaceTB/SmolLM2-135M in the Hugging Face cache.
    `xares-eval demo` makes both and runs the demo tracks end to end.
    """
    _setup_logging(verbose)
