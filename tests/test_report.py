"""What organizers and participants see, on a real run: the results site (checked in headless Chromium),
the signed receipt, progress lines in a log, and a complete run.log."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import demo_a_world

from evaluator.cli import eval_cli
from evaluator.resources import template_dir

pytestmark = pytest.mark.slow

ARTIFACTS = Path(os.environ.get("XARES_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts"))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """`xares-eval keygen`, then `xares-eval run` of the template on demo-a in a subprocess whose output is
    not a terminal (as in CI or `make demo > log`), signing its results."""
    from evaluator.submission.build import build

    root = tmp_path_factory.mktemp("report")
    shutil.copytree(template_dir() / "onnx", root / "encoder")
    build(root / "encoder", root / "submission.tar")
    data_home, _ = demo_a_world(root, decoder_steps=60)
    keys = CliRunner().invoke(eval_cli, ["keygen", "--out", str(root / "organizer")])
    assert keys.exit_code == 0, keys.output
    env = dict(os.environ, HF_HUB_OFFLINE="1", XARES_PROGRESS_SECONDS="0")
    proc = subprocess.run(
        [sys.executable, "-m", "evaluator", "run", str(root / "submission.tar"), "--track", "demo-a", "--out",
         str(root / "out"), "--decoder", str(root / "decoder"), "--max-steps", "40", "--limit-clips", "8", "--offline",
         "--data-home", str(data_home), "--sign-key", str(root / "organizer.key")],
        env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = next((root / "out").glob("*/demo-a-*/results.json"))
    return root, proc, results


def test_a_run_without_a_terminal_reports_progress_in_lines(finished):
    _, proc, _ = finished
    err = proc.stderr
    for stage in ("[training]", "[generating demo-", "[extracting demo-"):
        assert stage in err, err
    training = [line for line in err.splitlines() if line.startswith("[training]")]
    assert "/40 steps" in training[0] and "steps/s" in training[0] and "left" in training[0]
    assert training[-1].endswith(", done") and "40/40" in training[-1]
    assert "\x1b[" not in err  # no terminal escapes in a log


def test_run_log_holds_the_whole_run_and_files_are_world_readable(finished):
    _, proc, results = finished
    log = (results.parent / "run.log").read_text()
    for step in ("Checking submission.tar", "probe:", "Extracting features", "Training the decoder",
                 "final loss", "Generating and scoring", "demo-voices: Accuracy"):
        assert step in log, step
    for path in (results, results.parent / "run.log", results.parent / "config.json", results.parent / "receipt.json"):
        assert stat.S_IMODE(path.stat().st_mode) & 0o044 == 0o044, path  # group and others may read


def test_the_receipt_verifies_and_a_changed_score_does_not(finished, tmp_path):
    root, _, results = finished
    ok = CliRunner().invoke(eval_cli, ["verify", str(results), "--key", str(root / "organizer.pub")])
    assert ok.exit_code == 0 and ok.output.startswith("ok: receipt"), ok.output
    receipt = json.loads((results.parent / "receipt.json").read_text())["payload"]
    assert receipt["model_digest"] and receipt["data_digests"] and receipt["decoder"]["files"]
    assert receipt["config"]["options"]["max_steps"] == 40
    copy = tmp_path / "run"
    shutil.copytree(results.parent, copy)
    doc = json.loads((copy / "results.json").read_text())
    doc["tasks"][0]["score"] = 0.99
    (copy / "results.json").write_text(json.dumps(doc))
    bad = CliRunner().invoke(eval_cli, ["verify", str(copy / "results.json"), "--key", str(root / "organizer.pub")])
    assert bad.exit_code == 1 and f"score of task {doc['tasks'][0]['task']}" in bad.output, bad.output


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("CI must run the browser tests: install Debian's chromium (make system-deps)")
        pytest.skip("no chromium here (apt-get install chromium)")
    return found


def _load(page: Path, screenshot: Path | None = None, fragment: str = "") -> tuple[str, list[str]]:
    """The page's DOM after its scripts ran, and the console lines it logged, from headless Chromium."""
    base = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            "--enable-logging=stderr", "--v=0", f"--user-data-dir={page.parent / '.chromium'}"]
    dom = subprocess.run([*base, "--dump-dom", page.as_uri() + fragment], capture_output=True, text=True,
                         timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    console = [line for line in dom.stderr.splitlines() if ":CONSOLE" in line]
    if screenshot is not None:
        shot = subprocess.run([*base, "--window-size=1280,1800", f"--screenshot={screenshot}", page.as_uri()],
                              capture_output=True, text=True, timeout=120)
        assert shot.returncode == 0 and screenshot.stat().st_size > 10_000, shot.stderr[-2000:]
    return dom.stdout, console


def test_the_site_loads_in_a_browser_with_its_tables_and_plots(finished):
    root, proc, results = finished
    index = root / "out" / "site" / "index.html"
    assert f"Site: {index}" in proc.stdout
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    dom, console = _load(index, ARTIFACTS / "site-index.png")
    assert console == []  # no errors, no warnings: the pages log nothing
    assert '<table class="sortable">' in dom and "<svg" in dom and "Track demo-a: score per task" in dom
    assert "logmel-baseline" in dom and "chance" in dom
    page = next((root / "out" / "site").glob("*-demo-a-*.html"))
    assert f'href="{page.name}"' in dom
    dom, console = _load(page, ARTIFACTS / "site-run.png")
    assert console == []
    for section in ("Scores", "Decoder training", "Feature extraction", "Probe", "Samples"):
        assert f"<h2>{section}</h2>" in dom
    assert "Training loss" in dom and "prediction" in dom and ("right" in dom or "wrong" in dom)
    assert "demo-voices" in dom and "reference" in dom  # the sample browser and a confusion matrix's axis
    rows = [json.loads(line) for line in (results.parent / "predictions" / "demo-voices.jsonl").read_text().splitlines()]
    assert rows[0]["id"] in dom


def test_the_report_command_builds_the_site_of_several_runs_and_rejects_a_bad_file(finished, tmp_path):
    root, _, results = finished
    site = tmp_path / "site"
    result = CliRunner().invoke(eval_cli, ["report", str(results), "-o", str(site), "--title", "Challenge"])
    assert result.exit_code == 0 and (site / "index.html").is_file(), result.output
    assert "<title>Challenge</title>" in (site / "index.html").read_text()
    broken = tmp_path / "results.json"
    broken.write_text("{")
    bad = CliRunner().invoke(eval_cli, ["report", str(results), str(broken), "-o", str(tmp_path / "other")])
    assert bad.exit_code != 0 and "Traceback" not in bad.output and str(broken) in bad.output
    assert not (tmp_path / "other" / "index.html").exists()


def test_progress_lines_without_a_terminal(monkeypatch):
    from evaluator.progress import progress

    lines: list[str] = []
    monkeypatch.setenv("XARES_PROGRESS_SECONDS", "5")
    clock = iter(range(0, 1000, 10))
    monkeypatch.setattr("evaluator.progress.time.monotonic", lambda: float(next(clock)))
    with progress("training", total=100, unit="steps", write=lines.append) as bar:
        for step in range(1, 6):
            bar.set(step * 20, f"loss {1 / step:.2f}")
    assert lines[0] == "[training] 20/100 steps, 2 steps/s, 10s elapsed, ~40s left (loss 1.00)"
    assert lines[-1].startswith("[training] 100/100 steps") and lines[-1].endswith(", done")
    with progress("quiet", total=3, enabled=False) as bar:
        bar.advance(3)  # nothing to show, nothing raised


def test_a_campaign_job_sends_every_report_to_its_log(monkeypatch):
    """Inside `lines_to` (a campaign job), reports turned off for the terminal still reach the job's log as
    lines; outside it nothing changes, and the sink does not leak into other threads' contexts."""
    import threading

    from evaluator.progress import lines_to, progress, waiting

    monkeypatch.setenv("XARES_PROGRESS_SECONDS", "0")
    log: list[str] = []
    with lines_to(log.append):
        with progress("training", total=4, enabled=False) as bar:
            bar.advance(2)
        with waiting("scoring clotho", enabled=False):
            pass
        seen_elsewhere: list[str] = []
        worker = threading.Thread(target=lambda: progress("other", total=1, enabled=False,
                                                          write=seen_elsewhere.append).__enter__().advance(1))
        worker.start()
        worker.join()
    assert log[0].startswith("[training] 2/4 steps") and seen_elsewhere == []
    with progress("after", total=1, enabled=False) as bar:
        bar.advance(1)
    assert not any(line.startswith("[after]") for line in log)


def test_a_run_folder_with_a_bad_results_file_still_gets_its_site(finished, tmp_path):
    """`run` writes the site of every run under --out: an unreadable results.json there is left out, and
    the site of the others is written (the run that just finished must not fail on an old file)."""
    from evaluator.report import write_site

    root, _, results = finished
    out = tmp_path / "out"
    shutil.copytree(results.parent, out / results.parent.parent.name / results.parent.name)
    (out / "old-0123456789ab" / "A-0123456789ab").mkdir(parents=True)
    (out / "old-0123456789ab" / "A-0123456789ab" / "results.json").write_text('{"schema_version": 0}')
    index = write_site(out)
    page = index.read_text()
    assert "logmel-baseline" in page and "old-0123456789ab" not in page


def test_a_long_call_without_steps_still_reports_while_it_runs(monkeypatch):
    """Scoring a task with a metric's models is one call: lines keep coming while it runs, and stop after."""
    import time

    from evaluator.progress import waiting

    monkeypatch.setenv("XARES_PROGRESS_SECONDS", "0.05")
    lines: list[str] = []
    with waiting("scoring demo-captions", write=lines.append):
        time.sleep(0.4)
    seen = len(lines)
    time.sleep(0.2)
    assert seen >= 3 and len(lines) == seen, lines
    assert lines[0].startswith("[scoring demo-captions] still running, ") and lines[0].endswith("elapsed")


def test_the_leaderboard_sorts_in_the_browser(finished, tmp_path):
    """The header-click sorting, run by Chromium through a #sort= link: two submissions change places."""
    from evaluator.report import build_site

    _, _, results = finished
    other = tmp_path / "other" / "run" / "results.json"
    other.parent.mkdir(parents=True)
    doc = json.loads(results.read_text())
    doc["submission"] = {"name": "zz-second", "sha256": "f" * 64}
    for task in doc["tasks"]:
        task["score"] = min(1.0, task["score"] + 0.5)
    other.write_text(json.dumps(doc))
    index = build_site([results, other], tmp_path / "site")

    def order(fragment: str) -> list[str]:
        dom, console = _load(index, fragment=fragment)
        assert console == []
        return sorted(["logmel-baseline", "zz-second"], key=dom.index)

    assert order("") == ["zz-second", "logmel-baseline"]  # by rank: the second scores higher
    assert order("#sort=score") == ["logmel-baseline", "zz-second"]  # ascending
    assert order("#sort=-score") == ["zz-second", "logmel-baseline"]
    assert order("#sort=submission") == ["logmel-baseline", "zz-second"]
