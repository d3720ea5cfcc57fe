"""`xares-eval campaign` with the local executor: two real demo submissions and a broken one on demo-a,
a status table read from the state file, a rerun that does no work, a killed campaign shown as such."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from click.testing import CliRunner
from conftest import demo_a_world

from evaluator.cli import eval_cli
from evaluator.resources import template_dir

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from evaluator.submission.build import build

    root = tmp_path_factory.mktemp("campaign")
    for name, bands in (("mel80", 80), ("mel40", 40)):
        folder = root / name
        shutil.copytree(template_dir() / "onnx", folder)
        source = (folder / "encoder.py").read_text()
        (folder / "encoder.py").write_text(source.replace("N_MELS = 80", f"N_MELS = {bands}"))
        manifest = json.loads((folder / "manifest.json").read_text())
        (folder / "manifest.json").write_text(json.dumps({**manifest, "name": name}))
        build(folder, root / f"{name}.tar")
    (root / "broken.tar").write_bytes(b"not a tar")
    data_home, _ = demo_a_world(root, decoder_steps=40)
    return root, data_home


def _args(root, data_home, out, *extra):
    return ["campaign", str(root / "mel80.tar"), str(root / "broken.tar"), str(root / "mel40.tar"),
            "--tracks", "demo-a", "--out", str(out), "--decoder", str(root / "decoder"), "--max-steps", "4",
            "--limit-clips", "4", "--offline", "--data-home", str(data_home), "--quiet", *extra]


def test_a_campaign_runs_reports_and_resumes(world, tmp_path):
    root, data_home = world
    out = tmp_path / "camp"
    result = CliRunner().invoke(eval_cli, _args(root, data_home, out, "--pack", "2"))
    assert result.exit_code == 1, result.output  # the broken submission
    assert "error: 1 of 3 jobs failed" in result.output and "Traceback" not in result.output
    jobs = {j["submission"]: j for j in json.loads((out / "campaign.json").read_text())["jobs"]}
    assert jobs["mel80.tar"]["status"] == jobs["mel40.tar"]["status"] == "done"
    assert jobs["broken.tar"]["status"] == "failed" and "not a readable tar archive" in jobs["broken.tar"]["reason"]
    assert (out / jobs["mel40.tar"]["results"]).is_file()
    board = (out / "leaderboard.md").read_text()
    assert "mel80" in board and "mel40" in board and "broken.tar" in board.split("failed")[-1]
    page = (out / "leaderboard.html").read_text()
    assert page.count("<html>") == 1 and "<h2>Failed</h2>" in page and "broken.tar" in page
    assert (out / "leaderboard.tsv").read_text().startswith("rank\tsubmission")
    # status reads the state file
    status = CliRunner().invoke(eval_cli, ["campaign", "status", str(out)])
    assert status.exit_code == 0 and "2 done, 1 failed" in status.output
    # a rerun does no work for the finished jobs (only the broken one is tried again)
    again = CliRunner().invoke(eval_cli, _args(root, data_home, out, "--pack", "2"))
    assert again.exit_code == 1 and "Training" not in again.output and "Extracting" not in again.output
    # other settings: every job runs again (and the runs reuse what their keys allow)
    changed = CliRunner().invoke(eval_cli, _args(root, data_home, out, "--max-steps", "5"))
    assert changed.exit_code == 1 and changed.output.count("Training the decoder") == 2, changed.output


def test_a_killed_campaign_shows_interrupted_jobs(world, tmp_path):
    from evaluator.campaign import STATE_FILE, STATE_FORMAT

    dead = subprocess.Popen(["true"])
    dead.wait()
    out = tmp_path / "camp"
    out.mkdir()
    (out / STATE_FILE).write_text(json.dumps({"format": STATE_FORMAT, "settings": {}, "jobs": [
        {"submission": "a.tar", "track": "A", "status": "running", "reason": "", "seconds": None, "results": "",
         "pid": dead.pid}]}))
    status = CliRunner().invoke(eval_cli, ["campaign", "status", str(out)])
    assert status.exit_code == 0 and "1 interrupted" in status.output
    for bad in ("not json", json.dumps({"format": "other"})):
        (out / STATE_FILE).write_text(bad)
        status = CliRunner().invoke(eval_cli, ["campaign", "status", str(out)])
        assert status.exit_code == 2 and "not a campaign state file" in status.output
    status = CliRunner().invoke(eval_cli, ["campaign", "status", str(tmp_path / "nothing")])
    assert status.exit_code == 2 and "not a campaign folder" in status.output
    missing = CliRunner().invoke(eval_cli, ["campaign", str(tmp_path / "absent.tar"), "--out", str(out)])
    assert missing.exit_code == 2 and "no such submission file" in missing.output


def test_a_campaign_killed_mid_training_resumes_to_the_same_results(world, tmp_path):
    """SIGKILL the campaign process once a checkpoint exists; the rerun finishes from it, and every score
    equals an uninterrupted campaign's (fp32 is deterministic)."""
    import os
    import signal
    import sys
    import time

    root, data_home = world
    args = ["--tracks", "demo-a", "--decoder", str(root / "decoder"), "--max-steps", "60", "--checkpoint-every", "5",
            "--limit-clips", "4", "--offline", "--data-home", str(data_home), "--quiet", "--threads", "1"]
    subs = [str(root / "mel80.tar"), str(root / "mel40.tar")]
    cli = [sys.executable, "-m", "evaluator", "campaign", *subs]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    killed = tmp_path / "killed"
    proc = subprocess.Popen([*cli, "--out", str(killed), *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not list(killed.glob("runs/*/train-*/checkpoint-*")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, "the campaign ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    status = CliRunner().invoke(eval_cli, ["campaign", "status", str(killed)])
    assert "interrupted" in status.output or "waiting" in status.output, status.output
    rerun = subprocess.run([*cli, "--out", str(killed), *args], env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "resumed from step" in rerun.stdout
    whole = tmp_path / "whole"
    subprocess.run([*cli, "--out", str(whole), *args], env=env, capture_output=True, text=True, timeout=600, check=True)
    for out in (killed, whole):
        assert {j["status"] for j in json.loads((out / "campaign.json").read_text())["jobs"]} == {"done"}

    def scores(out):
        return sorted((j["submission"], json.dumps(json.loads((out / j["results"]).read_text())["tasks"]))
                      for j in json.loads((out / "campaign.json").read_text())["jobs"])

    assert scores(killed) == scores(whole)
