"""``xares-eval leaderboard``: rank submissions per track from results.json files.

    xares-eval leaderboard out/*/*/results.json --format md
"""

from __future__ import annotations

import html
from pathlib import Path

import click

from evaluator import scoring
from evaluator.fileio import atomic_write_text
from evaluator.scoring import Row

FIXED_COLUMNS = ("rank", "submission", "sha256", "track", "score", "public", "hidden")
TRAILING_COLUMNS = ("machines", "note")
SHA_SHOWN = 12  # hex digits of the submission digest shown


def _percent(value: float | None, decimals: int) -> str:
    return "" if value is None else f"{100 * value:.{decimals}f}"


def build_table(rows: list[Row], decimals: int = 1) -> tuple[list[str], list[list[str]]]:
    """Header and cells (plain text) of the leaderboard; every format renders this same table.

    Task columns are the union over tracks (public tasks first); a task of another track is blank,
    a failed task reads "failed" (counted as 0), an expected but absent one reads "missing".
    """
    columns: list[tuple[str, bool]] = []
    for row in rows:
        for col in row.expected:
            if col not in columns:
                columns.append(col)
    task_names = [name for name, _ in columns]
    header = [*FIXED_COLUMNS, *task_names, *TRAILING_COLUMNS]
    body = []
    for row in rows:
        e, r = row.entry, row.result
        by_name = {t.task: t for t in e.tasks}
        cells = []
        for name, hidden in columns:
            t = by_name.get(name)
            if t is not None:
                cells.append("failed" if t.failed else _percent(t.score, decimals))
            elif (name, hidden) in row.expected and name in r.missing:
                cells.append("missing")
            else:
                cells.append("")
        body.append([
            str(row.rank), e.submission, e.sha256[:SHA_SHOWN], e.track, _percent(r.score, decimals),
            _percent(r.public, decimals), _percent(r.hidden, decimals), *cells,
            ",".join(e.machines), "; ".join(r.notes),
        ])
    return header, body


def _one_line(text: str) -> str:
    return " ".join(text.split())


def render_tsv(header: list[str], body: list[list[str]]) -> str:
    return "".join("\t".join(_one_line(c) for c in line) + "\n" for line in [header, *body])


def render_md(header: list[str], body: list[list[str]]) -> str:
    def cell(text: str) -> str:
        return _one_line(text).replace("\\", "\\\\").replace("|", "\\|")

    lines = ["| " + " | ".join(cell(c) for c in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in line) + " |" for line in body]
    return "\n".join(lines) + "\n"


def render_html(header: list[str], body: list[list[str]]) -> str:
    def row(tag: str, cells: list[str]) -> str:
        return "<tr>" + "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in cells) + "</tr>"

    return "\n".join([
        "<!DOCTYPE html>",
        '<html><head><meta charset="utf-8"><title>XARES-LLM leaderboard</title></head><body>',
        "<table>",
        f"<thead>{row('th', header)}</thead>",
        "<tbody>",
        *(row("td", line) for line in body),
        "</tbody>",
        "</table>",
        "</body></html>",
    ]) + "\n"


RENDERERS = {"md": render_md, "tsv": render_tsv, "html": render_html}




EPILOG = """\b
Examples:
  xares-eval leaderboard out/*/*/results.json      # out/<submission>-<sha12>/<track>-<key12>/
  xares-eval leaderboard a.json a-hidden.json b.json --format tsv -o scores.tsv
  xares-eval leaderboard machine1/results.json machine2/results.json --format html -o board.html
"""


@click.command("leaderboard", epilog=EPILOG)
@click.argument("results", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(sorted(RENDERERS)), default="md", show_default=True,
              help="Output format: markdown table, tab-separated values, or an HTML page.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the table to this file (atomically) instead of stdout.")
@click.option("--decimals", type=click.IntRange(1, 6), default=1, show_default=True,
              help="Decimals of the percent scores.")
def leaderboard(results: tuple[Path, ...], fmt: str, output: Path | None, decimals: int) -> None:
    """Rank submissions per track from RESULTS.json files (scores in percent).

    RESULTS are results.json files written by `xares-eval run` (or any document following
    results.schema.json). Files of one submission (same sha256) are combined per track: "A-hidden"
    feeds Track A and "B-hidden" Track B; with several machines each task keeps its best score.
    Track score = (mean of public tasks + mean of hidden tasks) / 2, or the mean of the half that
    exists (flagged partial). A failed task counts as 0. If any file is unreadable or invalid,
    nothing is ranked and every bad file is listed.
    """
    rows = scoring.leaderboard(scoring.load_many(list(results)))
    text = RENDERERS[fmt](*build_table(rows, decimals))
    if output is None:
        click.echo(text, nl=False)
    else:
        atomic_write_text(output, text)
        click.echo(f"wrote {output} ({len(rows)} rows)", err=True)
