"""`xares-eval campaign`: two real demo submissions (the ONNX template at two mel sizes) and a broken one,
on demo-a and demo-b with a real tiny decoder. The local executor in this process, in worker processes,
killed with SIGKILL and rerun; the status table read from the state file while and after it runs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from evaluator.cli import eval_cli
from evaluator.resources import template_dir

pytestmark = pytest.mark.slow

SUBS = ("mel80.tar", "mel40.tar")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Two template submissions, a broken archive, demo-a and demo-b data, a decoder that knows their texts."""
    from evaluator.data import generate_demo, get_track, iter_clips
    from evaluator.smoke_decoder import build_smoke_decoder
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
    data_home = root / "data"
    texts = []
    for track in ("demo-a", "demo-b"):
        generate_demo(track, data_home / track)
        spec = get_track(track, data_home=data_home)
        texts += [t for task in spec.train_tasks
                  for c in iter_clips(task, "train", data_home=data_home, limit=12) for t in c.targets]
    build_smoke_decoder(texts, root / "decoder", steps=40)
    return root, data_home


def common(root, data_home, *extra) -> list[str]:
    return ["--decoder", str(root / "decoder"), "--limit-clips", "4", "--offline", "--data-home", str(data_home),
            "--quiet", "--threads", "1", "--max-new-tokens", "12", *extra]


def jobs_of(out) -> dict:
    return {j["id"]: j for j in json.loads((out / "campaign.json").read_text())["jobs"]}


def scores(out) -> dict:
    """Every score job's task results (what the leaderboard is made of), by job."""
    return {k: json.loads((out / j["results"]).read_text())["tasks"] for k, j in jobs_of(out).items()
            if j["kind"] == "score"}


def test_a_campaign_runs_reports_and_resumes(world, tmp_path):
    root, data_home = world
    out = tmp_path / "camp"
    args = ["campaign", str(root / "mel80.tar"), str(root / "broken.tar"), str(root / "mel40.tar"),
            "--tracks", "demo-a", "--out", str(out), "--max-steps", "4", *common(root, data_home)]
    result = CliRunner().invoke(eval_cli, [*args, "--pack", "2"])
    assert result.exit_code == 1, result.output  # the broken submission
    assert "Traceback" not in result.output and "jobs failed" in result.output
    jobs = jobs_of(out)
    # the graph: extract per submission, one train job per pack of two, score per submission
    assert sorted(jobs) == sorted(
        [f"extract/demo-a/{s}" for s in ("mel80.tar", "broken.tar", "mel40.tar")]
        + ["train/demo-a/mel80.tar+broken.tar", "train/demo-a/mel40.tar"]
        + [f"score/demo-a/{s}" for s in ("mel80.tar", "broken.tar", "mel40.tar")])
    assert jobs["train/demo-a/mel80.tar+broken.tar"]["deps"] == ["extract/demo-a/mel80.tar",
                                                                 "extract/demo-a/broken.tar"]
    for s in SUBS:
        assert jobs[f"score/demo-a/{s}"]["status"] == "done" and (out / jobs[f"score/demo-a/{s}"]["results"]).is_file()
    assert jobs["extract/demo-a/broken.tar"]["status"] == "failed"
    assert "not a readable tar archive" in jobs["extract/demo-a/broken.tar"]["reason"]
    # the failure reaches the jobs that need it, with its reason; its pack partner is trained
    pack = jobs["train/demo-a/mel80.tar+broken.tar"]
    assert pack["status"] == "done" and list(pack["failed"]) == ["broken.tar"]
    assert jobs["score/demo-a/broken.tar"]["reason"] == jobs["extract/demo-a/broken.tar"]["reason"]
    # each job has its log; the packed decoder was trained in one pack of one (its partner failed)
    assert "Training 1 decoder (a pack of one)" in (out / "logs" / "train__demo-a__mel80.tar+broken.tar.log").read_text()
    board = (out / "leaderboard.md").read_text()
    assert "mel80" in board and "mel40" in board and "broken.tar" in board.split("failed")[-1]
    page = (out / "leaderboard.html").read_text()
    assert page.count("<html>") == 1 and "<h2>Failed</h2>" in page and "broken.tar" in page
    assert (out / "leaderboard.tsv").read_text().startswith("rank\tsubmission")
    status = CliRunner().invoke(eval_cli, ["campaign", "status", str(out)])
    assert status.exit_code == 0 and "6 done, 2 failed" in status.output, status.output
    # a rerun does no work for the finished jobs: only the failed ones (and the pack with a failed member) run
    again = CliRunner().invoke(eval_cli, [*args, "--pack", "2"])
    assert again.exit_code == 1 and "3 of 8 jobs to run" in again.output, again.output
    assert "done train/demo-a/mel40.tar" not in again.output and "done score/demo-a/mel40.tar" not in again.output
    assert "done train/demo-a/mel80.tar+broken.tar" in again.output
    assert "reused the finished checkpoint" in (out / "logs" / "train__demo-a__mel80.tar+broken.tar.log").read_text()
    # other settings: every job runs again
    changed = CliRunner().invoke(eval_cli, [*args, "--max-steps", "5"])
    assert changed.exit_code == 1 and "9 of 9 jobs to run" in changed.output, changed.output
    # a resubmitted archive under the same name: its jobs run again, the others' do not
    (root / "mel40.tar").touch()
    resubmitted = CliRunner().invoke(eval_cli, [*args, "--max-steps", "5"])
    assert "6 of 9 jobs to run" in resubmitted.output, resubmitted.output  # mel40's 3 + the broken one's 3
    os.utime(root / "mel40.tar", ns=(0, 0))  # other tests key nothing on it, but keep it old


def test_status_reads_running_interrupted_and_bad_state(world, tmp_path):
    from evaluator.campaign import STATE_FILE, STATE_FORMAT, log_path

    out = tmp_path / "camp"
    out.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()

    def state(pid):
        job = {"id": "train/A/a.tar", "kind": "train", "track": "A", "submissions": ["a.tar"]}
        (out / STATE_FILE).write_text(json.dumps({"format": STATE_FORMAT, "settings": {}, "jobs": [job], "driver": {
            "host": os.uname().nodename, "pid": pid, "started": time.time() - 5}}))

    start = log_path(out, "train/A/a.tar").with_suffix(".start.json")
    start.parent.mkdir()
    start.write_text(json.dumps({"host": "node-7", "pid": 4242, "started": time.time()}))
    state(os.getpid())  # the campaign's process is alive: the started job is running, and where
    status = CliRunner().invoke(eval_cli, ["campaign", "status", str(out)])
    assert status.exit_code == 0 and "1 running" in status.output and "node-7:4242" in status.output
    state(dead.pid)  # its process is gone
    status = CliRunner().invoke(eval_cli, ["campaign", "status", str(out)])
    assert "1 interrupted" in status.output, status.output
    start.write_text(json.dumps({"host": "node-7", "pid": 4242, "started": time.time() - 3600}))  # an older run's
    status = CliRunner().invoke(eval_cli, ["campaign", "status", str(out)])
    assert "1 waiting" in status.output, status.output
    for bad in ("not json", json.dumps({"format": "other"}), json.dumps([1])):
        (out / STATE_FILE).write_text(bad)
        status = CliRunner().invoke(eval_cli, ["campaign", "status", str(out)])
        assert status.exit_code == 2 and "not a campaign state file" in status.output
    status = CliRunner().invoke(eval_cli, ["campaign", "status", str(tmp_path / "nothing")])
    assert status.exit_code == 2 and "not a campaign folder" in status.output
    missing = CliRunner().invoke(eval_cli, ["campaign", str(tmp_path / "absent.tar"), "--out", str(out)])
    assert missing.exit_code == 2 and "no such submission file" in missing.output
    both = CliRunner().invoke(eval_cli, ["campaign", str(world[0] / "mel80.tar"), "--out", str(out), "--ray",
                                         "--jobs", "2"])
    assert both.exit_code == 2 and "--jobs is for this machine" in both.output


def campaign_cli(root, out, *args) -> list[str]:
    return [sys.executable, "-m", "evaluator", "campaign", *(str(root / s) for s in SUBS), "--out", str(out), *args]


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory):
    """An uninterrupted campaign in this process, on both demo tracks: what every other executor must equal."""
    root, data_home = world
    out = tmp_path_factory.mktemp("reference") / "camp"
    options = ["--tracks", "demo-a,demo-b", "--max-steps", "40", "--checkpoint-every", "5", *common(root, data_home)]
    result = CliRunner().invoke(eval_cli, ["campaign", *(str(root / s) for s in SUBS), "--out", str(out), *options])
    assert result.exit_code == 0, result.output
    assert len(jobs_of(out)) == 12 and {j["status"] for j in jobs_of(out).values()} == {"done"}
    return out, options


def kill_when_training(out, proc, job_prefix: str) -> int:
    """SIGKILL the process running the first train job once it has written a checkpoint; its pid."""
    from evaluator.campaign import LOGS_DIR

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and (proc is None or proc.poll() is None):
        checkpoints = list(out.glob("runs/*/train-*/checkpoint-*"))
        starts = sorted((out / LOGS_DIR).glob(f"{job_prefix}*.start.json"))
        if checkpoints and starts:
            pid = json.loads(starts[0].read_text())["pid"]
            os.kill(pid, signal.SIGKILL)
            return pid
        time.sleep(0.1)
    raise AssertionError("no training to kill: the campaign ended first or never trained")


def test_a_campaign_killed_mid_training_resumes_to_the_same_results(world, reference, tmp_path):
    """SIGKILL the campaign process once a checkpoint exists; the rerun finishes from it, and every score
    equals an uninterrupted campaign's (fp32 is deterministic)."""
    root, _ = world
    ref_out, options = reference
    out = tmp_path / "killed"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    cli = campaign_cli(root, out, *options)
    proc = subprocess.Popen(cli, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert kill_when_training(out, proc, "train__") == proc.pid
    proc.wait()
    status = CliRunner().invoke(eval_cli, ["campaign", "status", str(out)])
    assert "interrupted" in status.output, status.output
    rerun = subprocess.run(cli, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    logs = "".join(p.read_text() for p in (out / "logs").glob("train__*.log"))
    assert "resumed from step" in logs
    assert scores(out) == scores(ref_out)


def test_worker_processes_give_the_same_results(world, reference, tmp_path):
    """--jobs 2: jobs in two worker processes, one SIGKILLed mid-training and rerun by the executor."""
    root, _ = world
    ref_out, options = reference
    out = tmp_path / "jobs2"
    cli = campaign_cli(root, out, *options, "--jobs", "2")
    proc = subprocess.Popen(cli, env=dict(os.environ, HF_HUB_OFFLINE="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    killed = kill_when_training(out, proc, "train__")
    assert killed != proc.pid  # a worker, not the campaign
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output
    assert scores(out) == scores(ref_out)
    wheres = {j["where"].split(":")[1] for j in jobs_of(out).values()}
    assert str(proc.pid) not in wheres and len(wheres) >= 2  # the jobs ran in worker processes
