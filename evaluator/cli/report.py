"""``xares-eval report``: the static results site of results.json files."""

from __future__ import annotations

from pathlib import Path

import click

EPILOG = """\b
Examples:
  xares-eval report out/*/*/results.json -o site/
  xares-eval report out/*/*/results.json -o /var/www/xares --title "Interspeech 2026 challenge"

\b
The pages are self-contained (inline styles and plots): open site/index.html from disk or serve the
folder as it is. Each results.json's run folder adds the details (predictions, probe, training curve)."""


@click.command("report", epilog=EPILOG)
@click.argument("results", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path), default=Path("site"),
              show_default=True, help="The site's folder.")
@click.option("--title", default="XARES-LLM results", show_default=True, help="The pages' title.")
def report(results: tuple[Path, ...], output: Path, title: str) -> None:
    """Write the results site of RESULTS (results.json files): leaderboards, plots, one page per run."""
    from evaluator.report import build_site

    index = build_site(list(results), output, title=title)
    click.echo(f"Site: {index}")
