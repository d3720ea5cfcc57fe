"""The results site: static, self-contained HTML pages built from results.json files and their run folders.

    xares-eval report out/*/*/results.json -o site/

``index.html`` ranks the submissions per track (public, hidden and final scores; sortable; partial and
failed flagged) and plots every submission's score on each task next to the task's chance level. One page
per submission and track shows its task scores, the training loss curve, extraction and training times,
the probe's checks, and a sample browser per task (clip, references, prediction, right or wrong) with a
confusion matrix for single-label classification. Everything is inline (CSS, a few lines of JavaScript,
plots as SVG drawn by matplotlib): the pages work from ``file://`` with no network.

The run folder (``results.json``'s parent: config.json, probe.json, predictions/, and the decoder's
train.json it names) gives the details; a results.json alone still gets its row and scores.
"""

from __future__ import annotations

import html
import io
import json
import logging
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from evaluator.errors import first_line
from evaluator.fileio import atomic_write_text

logger = logging.getLogger(__name__)

INDEX = "index.html"
SITE_DIR = "site"
SAMPLES_SHOWN = 200  # rows of the sample browser per task
CONFUSION_LABELS = 20  # most frequent labels of a confusion matrix; the rest are "other"
TITLE = "XARES-LLM results"


@dataclass
class RunView:
    """One results.json and what its run folder holds."""

    path: Path
    results: object  # scoring.Results
    document: dict  # the raw results.json (created, evaluator_version, config)
    page: str  # file name of its page
    config: dict = field(default_factory=dict)
    probe: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)
    predictions: dict[str, list[dict]] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.results.submission} ({self.results.sha256[:12]})"

    def task_info(self, task: str) -> dict:
        return (self.config.get("tasks") or {}).get(task, {})


def build_site(results: Sequence[Path], out: Path, *, title: str = TITLE) -> Path:
    """Write the site for ``results`` into ``out``; returns the index page.

    Raises:
        DataError: a results file is unreadable or invalid (nothing is written).
    """
    from evaluator.scoring import load_many

    results = [Path(p) for p in results]
    return _write(list(zip(results, load_many(results))), Path(out), title)


def write_site(out: Path, *, title: str = TITLE) -> Path:
    """The site of every run under a run output folder, in ``<out>/site``. A results.json there that cannot
    be read (an older layout, a file cut short) is left out with a warning: it must not fail the run that
    just finished."""
    from evaluator.errors import XaresError
    from evaluator.scoring import load_results

    usable = []
    for path in sorted(Path(out).glob("*/*/results.json")):
        try:
            usable.append((path, load_results(path)))
        except XaresError as e:
            logger.warning("the site leaves out %s: %s", path, first_line(e))
    return _write(usable, Path(out) / SITE_DIR, title)


def _write(parsed: list[tuple[Path, object]], out: Path, title: str) -> Path:
    from evaluator.scoring import leaderboard

    views = [_view(path, results, i) for i, (path, results) in enumerate(parsed)]
    out.mkdir(parents=True, exist_ok=True)
    for view in views:
        atomic_write_text(out / view.page, _run_page(view, title))
    index = out / INDEX
    atomic_write_text(index, _index_page(leaderboard([r for _, r in parsed]), views, title))
    return index


def _view(path: Path, results, i: int) -> RunView:
    name = re.sub(r"[^A-Za-z0-9._-]", "_", f"{results.submission}-{results.sha256[:12]}-{results.track}")
    view = RunView(path, results, json.loads(path.read_text()), f"{name}-{i}.html")
    folder = path.parent
    view.config = _json(folder / "config.json")
    view.probe = _json(folder / "probe.json")
    train_dir = view.config.get("train_dir")
    if train_dir:
        view.train = _json(Path(train_dir) / "train.json") or _json(folder.parent / Path(train_dir).name / "train.json")
    for task in results.tasks:
        rows = folder / "predictions" / f"{task.task}.jsonl"
        if rows.is_file():
            view.predictions[task.task] = [json.loads(line) for line in rows.read_text().splitlines() if line]
    return view


def _json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


# ---- scores and chance ---------------------------------------------------------------------------
def chance(task: str, view: RunView) -> float | None:
    """The score of always giving the most frequent answer of the test set (None: not computable here)."""
    from evaluator.metrics import METRICS, chance_level

    info, rows = view.task_info(task), view.predictions.get(task)
    metric = info.get("metric") or next((t.metric for t in view.results.tasks if t.task == task), None)
    if not rows or metric not in METRICS or METRICS[metric].needs_models:
        return None
    try:
        return chance_level(metric, [r["references"] for r in rows if r["references"]], **(info.get("metric_args") or {}))
    except Exception:  # noqa: BLE001 - a chance line is a courtesy; the scores themselves come from results.json
        return None


def _correct(metric: str | None, prediction: str, references: list[str]) -> bool | None:
    from evaluator.metrics import normalize

    if metric != "Accuracy":
        return None
    return normalize(prediction) in {normalize(r) for r in references}


# ---- plots (matplotlib, inline SVG) ----------------------------------------------------------------
def _svg(fig, salt: str) -> str:
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    with plt.rc_context({"svg.fonttype": "none", "svg.hashsalt": salt}):
        fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]  # no XML prologue inside HTML


def _figure(width: float, height: float):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height), dpi=100)


def task_plot(track: str, views: list[RunView], salt: str) -> str:
    """Every submission's score on each task of a track (public, then hidden), chance level marked."""
    tasks: list[tuple[str, bool]] = []
    for v in views:
        for t in v.results.tasks:
            if (t.task, t.hidden) not in tasks:
                tasks.append((t.task, t.hidden))
    tasks.sort(key=lambda t: (t[1], t[0]))
    fig, ax = _figure(7.5, 0.45 * len(tasks) + 1.2)
    n = max(1, len(views))
    height = 0.8 / n
    for k, v in enumerate(views):
        scores = {t.task: (0.0 if t.failed else 100 * t.score) for t in v.results.tasks}
        ys = [i - 0.4 + (k + 0.5) * height for i in range(len(tasks))]
        ax.barh(ys, [scores.get(name, 0.0) for name, _ in tasks], height=height * 0.9, label=v.label)
    chances = {}
    for name, _ in tasks:
        for v in views:
            c = chance(name, v)
            if c is not None:
                chances[name] = 100 * c
                break
    for i, (name, _) in enumerate(tasks):
        if name in chances:
            ax.plot([chances[name]] * 2, [i - 0.45, i + 0.45], color="black", linewidth=2,
                    label="chance" if i == min(j for j, (t, _) in enumerate(tasks) if t in chances) else None)
    ax.set_yticks(range(len(tasks)), [f"{name} (hidden)" if hidden else name for name, hidden in tasks])
    ax.invert_yaxis()
    ax.set_xlabel("score (%)")
    ax.set_title(f"Track {track}: score per task")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18 - 0.9 / (len(tasks) + 2)), ncol=2, fontsize="small",
              frameon=False)
    return _svg(fig, salt)


def loss_plot(view: RunView, salt: str) -> str | None:
    curve = view.train.get("loss_curve")
    if not curve:
        return None
    fig, ax = _figure(6.5, 3.0)
    ax.plot([c[0] for c in curve], [c[1] for c in curve], color="#1f77b4")
    ax.set_xlabel("training step")
    ax.set_ylabel("loss")
    ax.set_title("Training loss")
    ax.grid(alpha=0.3)
    return _svg(fig, salt)


def confusion(rows: list[dict]) -> tuple[list[str], list[list[int]]] | None:
    """Labels and counts [reference][prediction] of a single-label task (normalised text), or None."""
    from evaluator.metrics import normalize

    pairs = [(normalize(r["references"][0]), normalize(r["prediction"])) for r in rows if len(r["references"]) == 1]
    if not pairs:
        return None
    top = [label for label, _ in Counter(ref for ref, _ in pairs).most_common(CONFUSION_LABELS)]
    labels = top + ["(other)"]

    def index(label: str) -> int:
        return top.index(label) if label in top else len(top)

    counts = [[0] * len(labels) for _ in labels]
    for ref, pred in pairs:
        counts[index(ref)][index(pred)] += 1
    return labels, counts


def confusion_plot(labels: list[str], counts: list[list[int]], title: str, salt: str) -> str:
    size = 1.2 + 0.32 * len(labels)
    fig, ax = _figure(size + 1.5, size)
    image = ax.imshow(counts, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize="small")
    ax.set_yticks(range(len(labels)), labels, fontsize="small")
    ax.set_xlabel("prediction")
    ax.set_ylabel("reference")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, shrink=0.8)
    return _svg(fig, salt)


# ---- pages ---------------------------------------------------------------------------------------
CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1200px;
       padding: 0 1em; color: #1b1f24; }
h1 { font-size: 1.6em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #d0d7de; padding-bottom: .2em; }
table { border-collapse: collapse; margin: .8em 0; font-size: .92em; }
th, td { border: 1px solid #d0d7de; padding: .3em .6em; text-align: left; vertical-align: top; }
th { background: #f6f8fa; } table.sortable th { cursor: pointer; user-select: none; }
table.sortable th:after { content: " \\2195"; color: #8c959f; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.failed { background: #ffebe9; } .partial { background: #fff8c5; } .ok { color: #1a7f37; } .bad { color: #cf222e; }
.note { color: #57606a; font-size: .9em; } details { margin: .6em 0; } summary { cursor: pointer; font-weight: 600; }
svg { max-width: 100%; height: auto; } nav a { margin-right: 1em; }
"""

# Click a header to sort by its column (numbers as numbers); a second click reverses. A #sort=COLUMN
# link sorts on load.
SORT_JS = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  table.querySelectorAll("th").forEach(function (th, col) {
    th.addEventListener("click", function () {
      var body = table.tBodies[0], rows = Array.from(body.rows);
      var dir = th.dataset.dir === "asc" ? -1 : 1; th.dataset.dir = dir === 1 ? "asc" : "desc";
      rows.sort(function (a, b) {
        var x = a.cells[col].textContent.trim(), y = b.cells[col].textContent.trim();
        var nx = parseFloat(x), ny = parseFloat(y);
        if (!isNaN(nx) && !isNaN(ny)) { return dir * (nx - ny); }
        return dir * x.localeCompare(y);
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
// index.html#sort=score (ascending) or #sort=-score (descending): a link to a sorted leaderboard
var wanted = decodeURIComponent(location.hash).match(/^#sort=(-?)(.+)$/);
if (wanted) {
  document.querySelectorAll("table.sortable th").forEach(function (th) {
    if (th.textContent.trim() === wanted[2]) { th.click(); if (wanted[1]) { th.click(); } }
  });
}
"""


def _page(title: str, body: list[str]) -> str:
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
        *body, f"<script>{SORT_JS}</script>", "</body></html>",
    ]) + "\n"


def _table(header: list[str], rows: list[list[str]], *, sortable: bool = True, raw: bool = False,
           row_class: list[str] | None = None, numeric: set[int] | None = None) -> str:
    """An HTML table; cells are escaped unless ``raw`` (then they are HTML already)."""
    numeric = numeric or set()

    def cell(i: int, text: str) -> str:
        cls = ' class="num"' if i in numeric else ""
        return f"<td{cls}>{text if raw else html.escape(text)}</td>"

    head = "<thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr></thead>" if any(header) else ""
    lines = [f'<table{" class=sortable" if sortable else ""}>{head}<tbody>']
    for k, row in enumerate(rows):
        cls = f' class="{row_class[k]}"' if row_class and row_class[k] else ""
        lines.append(f"<tr{cls}>" + "".join(cell(i, c) for i, c in enumerate(row)) + "</tr>")
    lines.append("</tbody></table>")
    return "\n".join(lines)


def _index_page(rows, views: list[RunView], title: str) -> str:
    from evaluator.cli.leaderboard import build_table
    from evaluator.scoring import base_track

    body = [f"<h1>{html.escape(title)}</h1>",
            '<p class="note">Track score = (mean of the public tasks + mean of the hidden tasks) / 2, in percent; '
            "with several machines each task keeps its best score. Failed tasks count as 0.</p>"]
    tracks = sorted({r.entry.track for r in rows})
    body.append("<nav>" + "".join(f'<a href="#track-{html.escape(t)}">Track {html.escape(t)}</a>' for t in tracks)
                + "</nav>")
    for track in tracks:
        track_rows = [r for r in rows if r.entry.track == track]
        header, cells = build_table(track_rows)
        keep = [i for i, h in enumerate(header) if h != "track" and any(c[i] for c in cells)]
        header = [header[i] for i in keep]
        page_of = {}
        for v in views:
            if base_track(v.results.track) == track:
                page_of.setdefault((v.results.submission, v.results.sha256[:12]), []).append(v)
        body_rows, classes = [], []
        for row, line in zip(track_rows, cells):
            line = [html.escape(line[i]) for i in keep]
            links = page_of.get((row.entry.submission, row.entry.sha256[:12]), [])
            line[1] += "".join(f' <a href="{html.escape(v.page)}">[{html.escape(v.results.track)}]</a>'
                               for v in links)
            body_rows.append(line)
            failed = any(t.failed for t in row.entry.tasks)
            classes.append("failed" if failed else "partial" if row.result.notes else "")
        numeric = {i for i, h in enumerate(header) if h not in ("submission", "sha256", "machines", "note")}
        body += [f'<h2 id="track-{html.escape(track)}">Track {html.escape(track)}</h2>',
                 _table(header, body_rows, raw=True, row_class=classes, numeric=numeric),
                 '<p class="note">Rows with a failed task are red, partial tracks (public or hidden half '
                 "missing) yellow. Click a column to sort.</p>"]
        members = [v for v in views if base_track(v.results.track) == track]
        if members:
            body.append(f'<figure class="plot">{task_plot(track, members, f"track-{track}")}</figure>')
    return _page(title, body)


def _run_page(view: RunView, title: str) -> str:
    doc, res = view.document, view.results
    name = f"{res.submission} on {res.track}"
    body = [f'<nav><a href="{INDEX}">&larr; all results</a></nav>', f"<h1>{html.escape(name)}</h1>",
            f'<p class="note">sha256 {html.escape(res.sha256)} · machine {html.escape(res.machine)} · '
            f'evaluator {html.escape(str(doc.get("evaluator_version")))} · {html.escape(str(doc.get("created")))}</p>']
    # scores
    rows, classes = [], []
    for t in res.tasks:
        c = chance(t.task, view)
        rows.append([t.task, "hidden" if t.hidden else "public", t.metric,
                     "failed" if t.failed else f"{100 * t.score:.1f}",
                     "" if c is None else f"{100 * c:.1f}", str(t.n_samples), t.error or ""])
        classes.append("failed" if t.failed else "")
    body += ["<h2>Scores</h2>", _table(["task", "split", "metric", "score (%)", "chance (%)", "samples", "error"],
                                       rows, row_class=classes, numeric={3, 4, 5})]
    # training and times
    body.append("<h2>Decoder training</h2>")
    config = doc.get("config") or {}
    train = view.train
    facts = [["decoder", str(config.get("decoder", ""))], ["steps", str(train.get("steps", config.get("max_steps", "")))],
             ["precision", str(config.get("precision", ""))], ["device", str(config.get("device", ""))],
             ["training time", f"{train['seconds']:.0f} s" if train.get("seconds") is not None else "not recorded"]]
    body.append(_table(["", ""], facts, sortable=False))
    plot = loss_plot(view, f"loss-{view.page}")
    body.append(f'<figure class="plot">{plot}</figure>' if plot else '<p class="note">No loss curve recorded.</p>')
    extraction = view.config.get("extraction") or {}
    if extraction:
        rows = [[k, str(e.get("clips", "")), f"{e.get('audio_seconds') or 0:.0f}", f"{e.get('wall_seconds') or 0:.1f}",
                 str(e.get("device", "")), str(e.get("finished", ""))] for k, e in extraction.items()]
        body += ["<h2>Feature extraction</h2>",
                 _table(["task/split", "clips", "audio (s)", "time (s)", "device", "finished"], rows,
                        numeric={1, 2, 3})]
    # probe
    if view.probe:
        checks = [[c["name"], "ok" if c["ok"] else "FAILED", c.get("detail", "")] for c in view.probe.get("checks", [])]
        body += ["<h2>Probe</h2>", _table(["check", "result", "detail"], checks),
                 '<p class="note">' + html.escape(", ".join(
                     f"{k}: {view.probe.get(k)}" for k in ("batching", "feature_dtype", "seconds_per_audio_second",
                                                          "peak_memory_mb") if k in view.probe)) + "</p>"]
    # samples
    body.append("<h2>Samples</h2>")
    for t in res.tasks:
        rows = view.predictions.get(t.task)
        if not rows:
            continue
        metric = view.task_info(t.task).get("metric", t.metric)
        marks = [_correct(metric, r["prediction"], r["references"]) for r in rows]
        right = sum(1 for m in marks if m)
        summary = f"{t.task}: {len(rows)} samples" + (f", {right} right" if metric == "Accuracy" else "")
        table_rows = []
        for r, m in list(zip(rows, marks))[:SAMPLES_SHOWN]:
            mark = "" if m is None else ('<span class="ok">right</span>' if m else '<span class="bad">wrong</span>')
            table_rows.append([html.escape(r["id"]), html.escape(" | ".join(r["references"])),
                               html.escape(r["prediction"]), mark + (f" ({html.escape(r['status'])})"
                                                                     if r.get("status") not in (None, "ok") else "")])
        part = [f"<details><summary>{html.escape(summary)}</summary>",
                _table(["clip", "references", "prediction", ""], table_rows, raw=True)]
        if len(rows) > SAMPLES_SHOWN:
            part.append(f'<p class="note">first {SAMPLES_SHOWN} of {len(rows)} shown; all are in '
                        f"predictions/{html.escape(t.task)}.jsonl</p>")
        if metric == "Accuracy":
            matrix = confusion(rows)
            if matrix:
                plot = confusion_plot(*matrix, t.task, f"cm-{view.page}-{t.task}")
                part.append(f'<figure class="plot">{plot}</figure>')
        part.append("</details>")
        body += part
    return _page(f"{name} · {title}", body)
