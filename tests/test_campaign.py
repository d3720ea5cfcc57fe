"""`xares-eval campaign`: two real demo submissions (the ONNX template at two mel sizes) and a broken one,
on demo-a and demo-b with a real tiny decoder. The local executor in this process, in worker processes,
killed with SIGKILL and rerun; the status table read from the state file while and after it runs."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

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


def test_a_campaign_runs_reports_and_resumes(world, tmp_path, monkeypatch):
    root, data_home = world
    out = tmp_path / "camp"
    args = ["campaign", str(root / "mel80.tar"), str(root / "broken.tar"), str(root / "mel40.tar"),
            "--tracks", "demo-a", "--out", str(out), "--max-steps", "4", *common(root, data_home)]
    monkeypatch.setenv("XARES_PROGRESS_SECONDS", "0")  # every report a line: each job's log shows its stages
    result = CliRunner().invoke(eval_cli, [*args, "--pack", "2"])
    assert re.search(r"\[extracting \S+ \(\w+\)\] [1-9]\d* clips", (out / "logs" / "extract__demo-a__mel40.tar.log").read_text())
    assert "[training] " in (out / "logs" / "train__demo-a__mel40.tar.log").read_text()
    assert "[generating " in (out / "logs" / "score__demo-a__mel40.tar.log").read_text()
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
    site = (out / "site" / "index.html").read_text()
    assert "mel80" in site and "mel40" in site and f"Site: {out / 'site' / 'index.html'}" in result.output
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
    from evaluator.campaign import STATE_FILE, STATE_FORMAT, Campaign, log_path
    from evaluator.errors import ConfigError

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
        # the campaign itself stops on it too, rather than overwrite what it cannot read
        with pytest.raises(ConfigError, match="not a campaign state file"):
            Campaign(out)
    # a state file of the older layout (one record per submission and track) is planned afresh
    (out / STATE_FILE).write_text(json.dumps({"format": "xares-eval/campaign/1", "settings": {}, "jobs": [
        {"submission": "a.tar", "track": "A", "status": "done"}]}))
    assert Campaign(out).records == {}
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
    """SIGKILL the process running a train job mid-run (its own decoder folder has a checkpoint, its log no
    final loss yet); its pid. Any checkpoint and the first job's pid was not enough: on Ray that worker may
    have moved on to another job (found by a failed CI run)."""
    from evaluator.campaign import LOGS_DIR

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and (proc is None or proc.poll() is None):
        for start in sorted((out / LOGS_DIR).glob(f"{job_prefix}*.start.json")):
            log = start.with_name(start.name.removesuffix(".start.json") + ".log")
            text = log.read_text() if log.exists() else ""
            folder = re.search(r"-> (\S*train-\S+)", text)
            if folder and "final loss" not in text and list(Path(folder.group(1)).glob("checkpoint-*")):
                pid = json.loads(start.read_text())["pid"]
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
    with subprocess.Popen(cli, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as proc:
        try:
            assert kill_when_training(out, proc, "train__") == proc.pid
        finally:
            proc.kill()
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
    with subprocess.Popen(cli, env=dict(os.environ, HF_HUB_OFFLINE="1"), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True) as proc:
        try:
            killed = kill_when_training(out, proc, "train__")
            output, _ = proc.communicate(timeout=600)
        finally:
            proc.kill()
    assert killed != proc.pid and proc.returncode == 0, output  # a worker was killed, not the campaign
    assert scores(out) == scores(ref_out)
    wheres = {j["where"].split(":")[1] for j in jobs_of(out).values()}
    assert str(proc.pid) not in wheres and len(wheres) >= 2  # the jobs ran in worker processes


# ---- Ray ----------------------------------------------------------------------------------------
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Ray's own default for a new local instance is token authentication, with a token written to ~/.ray,
# which clusters started later then expect from every client: the tests' instances leave ~/.ray alone.
RAY_ENV = {"RAY_AUTH_MODE": "disabled"}


def need_ray() -> None:
    """Ray (the [cluster] extra), or a skip: a failure under CI, which must run these."""
    if shutil.which("ray", path=os.path.dirname(sys.executable)) is None:
        if os.environ.get("CI"):
            pytest.fail("CI must run the Ray tests: install the [cluster] extra")
        pytest.skip("Ray is not installed: pip install 'xares-eval[cluster]'")


@pytest.fixture(scope="module")
def ray_cluster():
    """A real two-node Ray cluster on this machine: `ray start --head` and a second `ray start --address`,
    one CPU each, in their own process groups (torn down with them; other Ray instances are left alone)."""
    import tempfile

    need_ray()
    ray = os.path.join(os.path.dirname(sys.executable), "ray")
    port = _free_port()
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1", OMP_WAIT_POLICY="PASSIVE", **RAY_ENV)
    node = ["--block", "--num-cpus=1", f"--memory={12 * 2**30}", "--object-store-memory=80000000"]
    procs = [subprocess.Popen([ray, "start", "--head", f"--port={port}", "--include-dashboard=false",
                               f"--temp-dir={temp}", "--disable-usage-stats", *node], env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    address = f"127.0.0.1:{port}"
    check = [sys.executable, "-c", f"import ray; ray.init(address={address!r}, log_to_driver=False); "
             "print(sum(n['Alive'] for n in ray.nodes()))"]
    try:
        deadline = time.monotonic() + 120
        while True:
            if len(procs) == 1 and subprocess.run(check, env=env, capture_output=True, timeout=60).returncode == 0:
                procs.append(subprocess.Popen([ray, "start", f"--address={address}", *node], env=env,
                                              start_new_session=True, stdout=subprocess.DEVNULL,
                                              stderr=subprocess.DEVNULL))
            if len(procs) == 2:
                alive = subprocess.run(check, env=env, capture_output=True, text=True, timeout=60).stdout.strip()
                if alive.endswith("2"):
                    break
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "the Ray cluster did not start"
            time.sleep(1)
        yield address
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        shutil.rmtree(temp, ignore_errors=True)


def test_a_ray_campaign_survives_a_killed_worker_and_equals_the_local_one(world, reference, ray_cluster, tmp_path):
    """Two demo submissions on demo-a and demo-b as Ray tasks over two nodes; the worker running a training
    job is SIGKILLed mid-run, Ray reruns the job, which resumes from its checkpoint; every score equals
    the local executor's; a second run of the command does no work."""
    root, _ = world
    ref_out, options = reference
    out = tmp_path / "ray"
    cli = campaign_cli(root, out, *options, "--ray", ray_cluster)
    env = dict(os.environ, HF_HUB_OFFLINE="1", **RAY_ENV)
    with subprocess.Popen(cli, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        try:
            killed = kill_when_training(out, proc, "train__")
            output, _ = proc.communicate(timeout=600)
        finally:
            proc.kill()
    assert killed != proc.pid and proc.returncode == 0, output
    assert scores(out) == scores(ref_out)
    jobs = jobs_of(out)
    nodes = {j["where"].split(" node ")[1] for j in jobs.values()}
    assert len(nodes) == 2, jobs  # both nodes ran jobs
    retried = [j for j in jobs.values() if j["kind"] == "train" and str(killed) not in j["where"]]
    logs = "".join(p.read_text() for p in (out / "logs").glob("train__*.log"))
    assert "resumed from step" in logs and retried  # the killed job ran again, elsewhere, from its checkpoint
    starts = {p: p.stat().st_mtime_ns for p in (out / "logs").glob("*.start.json")}
    again = subprocess.run(cli, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "every one of the 12 jobs is done" in again.stdout, again.stdout + again.stderr
    assert {p: p.stat().st_mtime_ns for p in (out / "logs").glob("*.start.json")} == starts
    status = CliRunner().invoke(eval_cli, ["campaign", "status", str(out)])
    assert "12 done" in status.output and " node " in status.output


def test_the_graph_puts_b_hidden_after_track_b_and_packs_decoders():
    from types import SimpleNamespace as Track

    from evaluator.campaign import plan_jobs

    tracks = [Track(name="B-hidden", decoder_track="B"), Track(name="A", decoder_track="A"),
              Track(name="B", decoder_track="B")]
    jobs = {j.id: j for j in plan_jobs(["x.tar", "y.tar", "z.tar"], tracks, pack=2)}
    # one decoder per submission and decoder track, in packs of two: B-hidden has none of its own
    assert sorted(j for j in jobs if j.startswith("train/")) == [
        "train/A/x.tar+y.tar", "train/A/z.tar", "train/B/x.tar+y.tar", "train/B/z.tar"]
    assert jobs["score/B-hidden/z.tar"].deps == ("extract/B-hidden/z.tar", "train/B/z.tar")
    assert jobs["train/B/x.tar+y.tar"].deps == ("extract/B/x.tar", "extract/B/y.tar")
    order = list(jobs)
    assert all(order.index(d) < order.index(j) for j in jobs for d in jobs[j].deps)
    # B-hidden alone: Track B's decoder is trained on the features its extraction stores
    alone = {j.id: j for j in plan_jobs(["x.tar"], [Track(name="B-hidden", decoder_track="B")], pack=None)}
    assert alone["train/B/x.tar"].via == "B-hidden" and alone["train/B/x.tar"].deps == ("extract/B-hidden/x.tar",)


def test_ray_asks_no_node_can_hold_fail_at_once():
    from evaluator.campaign import Job, StageResources, _check_fits
    from evaluator.errors import ConfigError
    from evaluator.runner import RunOptions

    resources, opts = StageResources(), RunOptions(device="cuda")
    train = Job("train/A/x.tar", "train", "A", ("x.tar",))
    small = {"CPU": 4.0, "memory": 6 * 2**30}
    with pytest.raises(ConfigError, match="no node of the Ray cluster can run a train job .*8.0 GiB memory"):
        _check_fits([small], {"train": resources.options(train, 0.0, opts)})
    _check_fits([small, {"CPU": 1.0, "memory": 9 * 2**30}], {"train": resources.options(train, 0.0, opts)})
    with pytest.raises(ConfigError, match="0.25 GPU"):  # the cluster has GPUs, but not on a node with the memory
        _check_fits([{"CPU": 8.0, "memory": 64 * 2**30}, {"GPU": 1.0, "CPU": 8.0, "memory": 2**30}],
                    {"train": resources.options(train, 1.0, opts)})


def test_a_local_ray_instance_runs_a_campaign(world, tmp_path, monkeypatch):
    """--ray with no address: a Ray instance started on this machine for the campaign."""
    need_ray()
    for key, value in RAY_ENV.items():
        monkeypatch.setenv(key, value)
    root, data_home = world
    out = tmp_path / "local-ray"
    keys = CliRunner().invoke(eval_cli, ["keygen", "--out", str(tmp_path / "organizer")])
    assert keys.exit_code == 0, keys.output
    result = CliRunner().invoke(eval_cli, ["campaign", str(root / "mel40.tar"), "--tracks", "demo-a", "--out", str(out),
                                           "--max-steps", "4", "--ray", "--sign-key", str(tmp_path / "organizer.key"),
                                           *common(root, data_home)])
    assert result.exit_code == 0, result.output
    assert "a local Ray instance" in result.output
    jobs = jobs_of(out)
    assert {j["status"] for j in jobs.values()} == {"done"} and all(" node " in j["where"] for j in jobs.values())
    assert scores(out)["score/demo-a/mel40.tar"]
    # the score job, on a Ray worker, signed its results with the organizer's key; the site lists them
    results = out / jobs["score/demo-a/mel40.tar"]["results"]
    verified = CliRunner().invoke(eval_cli, ["verify", str(results), "--key", str(tmp_path / "organizer.pub")])
    assert verified.exit_code == 0 and verified.output.startswith("ok: receipt"), verified.output
    assert "mel40" in (out / "site" / "index.html").read_text()


def test_the_progress_display_reports_every_job(world, tmp_path, capsys, monkeypatch):
    """With progress on a terminal, the campaign's bar runs and each finished job is one line under it;
    the jobs themselves run without bars of their own (theirs would clash with the campaign's)."""
    from evaluator.campaign import run_campaign
    from evaluator.data import get_track
    from evaluator.runner import RunOptions

    root, data_home = world
    track = get_track("demo-a", data_home=data_home)
    opts = RunOptions(decoder=str(root / "decoder"), data_home=data_home, download=False, progress=True, max_steps=2)
    lines: list[str] = []
    monkeypatch.setattr("sys.stdout.isatty", lambda: True)
    records = run_campaign([root / "broken.tar"], [track], tmp_path / "camp", opts, pack=1, echo=lines.append)
    assert {r.status for r in records} == {"failed"}
    shown = capsys.readouterr().out
    for job in ("extract/demo-a/broken.tar", "train/demo-a/broken.tar", "score/demo-a/broken.tar"):
        assert f"FAILED {job}" in shown
    assert lines[0].startswith("3 of 3 jobs to run (in this process)")


@pytest.mark.parametrize("address, reason", [
    ("127.0.0.1:1", "cannot reach the Ray cluster at 127.0.0.1:1"),
    ("127.0.0.1:port", "cannot reach the Ray cluster at 127.0.0.1:port"),
])
def test_a_ray_cluster_that_is_not_there_fails_in_seconds(world, tmp_path, address, reason):
    need_ray()
    root, data_home = world
    result = CliRunner().invoke(eval_cli, ["campaign", str(root / "mel40.tar"), "--tracks", "demo-a", "--out",
                                           str(tmp_path / "camp"), "--ray", address, *common(root, data_home)])
    assert result.exit_code == 2 and reason in result.output and "Traceback" not in result.output, result.output
