"""``xares-eval cleanup``: remove the Docker containers, volumes and image tags that dead xares-eval runs left.

    xares-eval cleanup --dry-run
    xares-eval cleanup
    xares-eval cleanup --all

Every container run also does this when it starts (`evaluator.sandbox.docker_cleanup.cleanup_stale`);
the command is for a machine where no run follows a hard kill.
"""

from __future__ import annotations

import click

from evaluator.errors import EnvironmentUnavailable


@click.command(
    epilog="""\b
Examples:
  xares-eval cleanup --dry-run   # list what dead evaluator processes left
  xares-eval cleanup             # remove it
  xares-eval cleanup --all       # also stop the runs of live evaluator processes
""",
)
@click.option("--dry-run", is_flag=True, help="List what would be removed; remove nothing.")
@click.option("--all", "include_live", is_flag=True,
              help="Also remove the objects of live xares-eval processes and of processes on other hosts "
                   "sharing this engine (their runs fail).")
def cleanup(dry_run: bool, include_live: bool) -> None:
    """Remove what hard-killed xares-eval runs left on the Docker engine.

    Only objects the evaluator labelled (containers, volumes, networks) or tagged (images, as
    xares-eval/sub-*) are looked at; an object whose owning process (host, pid, start time) still runs
    is kept unless --all is given. Exit code 3 when the engine refused a removal.
    """
    from evaluator.sandbox.docker_cleanup import cleanup_stale
    from evaluator.sandbox.docker_runtime import CONTROL_TIMEOUT_S, connect

    client = connect(timeout=CONTROL_TIMEOUT_S)
    try:
        report = cleanup_stale(client, include_live=include_live, dry_run=dry_run)
    finally:
        client.close()
    click.echo("Looking for what xares-eval runs left on the Docker engine")
    verb = "would remove" if dry_run else "removed"
    for line in report.removed:
        click.echo(f"  - {verb} {line}")
    for line in report.kept_live:
        click.echo(f"  - kept {line}")
    for line in report.failed:
        click.echo(f"  - could not remove {line}")
    kept = f"; kept {len(report.kept_live)} of live processes (--all removes them)" if report.kept_live else ""
    if report.removed:
        click.echo(f"{verb.capitalize()} {len(report.removed)} object(s){kept}.")
    else:
        click.echo(f"Nothing to remove{kept}.")
    if report.failed:
        raise EnvironmentUnavailable(f"the Docker engine refused to remove {len(report.failed)} object(s); "
                                     "see the lines above")
