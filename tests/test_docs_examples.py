"""Every example that the help and the README show, run as a reader would type it.

Each example goes to bash as text (bash does the globbing, braces and quoting), through the installed
console scripts, in a folder that holds what the docs say a reader has, in the order a reader meets them
(participant, organizer, tasks, demo, results, official tracks, campaign, cleanup). `PLANS` says how each
one must end; an example shown anywhere without a plan fails `test_every_example_has_a_plan`. The
official-track, campaign and Ray examples run in order in a second lane beside the reader's (`Organizer`):
they need only the archives and the key, and two lanes cut the wall time by a third on two cores.

- **done**: exit 0, no traceback, and what it writes or prints checked.
- **trains**: its documented job is hours of training (the official tracks' 100,000 steps, the full demo):
  it runs as typed until a training progress line shows that training is under way, then gets Ctrl-C
  (SIGINT to its process group, as a terminal sends it) and must exit 130 with the resume line. Finished
  runs of the same code are tested at demo scale (test_runner, test_campaign, test_report).
- **needs CUDA**: on a machine where torch sees no usable CUDA device it must stop within seconds, before
  any work, with exit 3 and the reason; where there is one it trains like the others.

The offline stand-ins for what a reader downloads (tests/standins.py) go through the real lookup code:
one short clip per shard file of every official task at the path its track YAML names under
./xares_data; a smoke decoder installed in the Hugging Face cache as HuggingFaceTB/SmolLM2-135M; the
organizer's hidden config; XARES-LLM's own task1 YAMLs. Absolute paths (/secure, /models, /shared,
/tmp/demo, /var/www, /data) are placed under the test's folder; DIR and PATH name the decoder the demo
built. The cleanup examples run against a Docker engine of their own: `--all` removes what live
evaluators own, and the engine of a shared machine is not the test's to clear.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from standins import install_in_hub_cache, write_hidden_config, write_track_shards
from test_cli_examples import collect_shown

from evaluator.cli import INTERRUPTED_EXIT, INTERRUPTED_MESSAGE

pytestmark = [pytest.mark.slow, pytest.mark.docker]

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SHOWN = collect_shown()
TRAINING_LINE = re.compile(r"^(\d\d:\d\d:\d\d )?\[training\] \d+/\d+ ", re.MULTILINE)  # a job log puts the time first


def key(example: str) -> str:
    """An example as the shell splits it (comments and quoting dropped): how `SHOWN` is keyed."""
    return shlex.join(shlex.split(example, comments=True))


# ------------------------------------------------------------------------------------------ the folder


@dataclass
class Outcome:
    code: int
    out: str
    err: str

    def __str__(self) -> str:
        return f"exit {self.code}\n--- stdout (tail)\n{self.out[-3000:]}\n--- stderr (tail)\n{self.err[-3000:]}"


@dataclass
class Workspace:
    """The reader's machine: ``home`` is their current folder, ``root/fs`` stands for ``/``."""

    root: Path
    env: dict[str, str]
    lanes: dict[str, dict[str, str]] = field(default_factory=lambda: {"reader": {}})  # each lane's setup so far
    organizer: Organizer | None = None  # the background lane, once started
    ray: tuple[subprocess.Popen, str] | None = None  # the Ray head for `--ray auto`, and its temp folder
    engine: tuple[subprocess.Popen, Path] | None = None  # the cleanup examples' own Docker engine, its folder
    bridges: set[str] = field(default_factory=set)  # the host's bridges before that engine started

    @property
    def home(self) -> Path:
        return self.root / "home"

    @property
    def extra_env(self) -> dict[str, str]:
        """What the examples so far set up (key, hidden config, Ray, engine), in the calling thread's lane."""
        return self.lanes[threading.current_thread().name if threading.current_thread().name in self.lanes
                          else "reader"]

    @property
    def decoder(self) -> Path:  # DIR and PATH: the decoder `xares-eval demo` builds
        return self.home / "demo_out" / "smoke-decoder"

    def fs(self, path: str) -> Path:
        return self.root / "fs" / path.lstrip("/")

    def shell_text(self, example: str, subs: dict[str, str]) -> str:
        text = re.sub(r"(?<=\s)/(?=[A-Za-z])", f"{self.root}/fs/", example)
        text = re.sub(r"(?<=\s)(DIR|PATH)(?=\s|$)", str(self.decoder), text)
        for old, new in subs.items():
            text = text.replace(old, new)
        return text

    def start(self, text: str, cwd: Path) -> tuple[subprocess.Popen, list[str], list[str], list[threading.Thread]]:
        cwd.mkdir(parents=True, exist_ok=True)
        proc = subprocess.Popen(["bash", "-c", text], cwd=cwd, env={**self.env, **self.extra_env}, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        out: list[str] = []
        err: list[str] = []
        readers = [threading.Thread(target=lambda s=s, b=b: b.extend(iter(s.readline, "")), daemon=True)
                   for s, b in ((proc.stdout, out), (proc.stderr, err))]
        for r in readers:
            r.start()
        return proc, out, err, readers

    @staticmethod
    def finish(proc, out, err, readers, timeout: float) -> Outcome:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            for r in readers:
                r.join(timeout=10)
            pytest.fail(f"still running after {timeout:.0f} s\n{Outcome(-9, ''.join(out), ''.join(err))}")
        for r in readers:
            r.join(timeout=30)
        return Outcome(proc.returncode, "".join(out), "".join(err))


# ------------------------------------------------------------------------------------------ judging


@dataclass(frozen=True)
class Plan:
    how: str = "done"  # "done" | "trains" | "cuda"
    cwd: str = "."  # relative to home
    before: Callable[[Workspace], None] | None = None
    check: Callable[[Workspace, Outcome], None] | None = None
    logs: str | None = None  # a campaign's logs folder (relative to home): its jobs' lines land there
    after: Callable[[Workspace], None] | None = None
    lane: str = "reader"  # "organizer": run by the background lane (see `Organizer`), the test waits for it


def run_done(ws: Workspace, text: str, cwd: Path, timeout: float = 900) -> Outcome:
    result = ws.finish(*ws.start(text, cwd), timeout=timeout)
    assert result.code == 0, result
    assert "Traceback" not in result.err, result
    return result


def log_sizes(logs: Path | None) -> dict[Path, int]:
    return {p: p.stat().st_size for p in logs.glob("train__*.log")} if logs is not None else {}


def training_under_way(out: list[str], err: list[str], logs: Path | None, before: dict[Path, int]) -> bool:
    """A progress line of training in the output, or in what a campaign's train job logged since the start."""
    if TRAINING_LINE.search("".join(err)) or TRAINING_LINE.search("".join(out)):
        return True
    for path in log_sizes(logs):
        with open(path, "rb") as fh:
            fh.seek(before.get(path, 0))
            if TRAINING_LINE.search(fh.read().decode(errors="replace")):
                return True
    return False


def run_until_training(ws: Workspace, text: str, cwd: Path, logs: Path | None, timeout: float = 900) -> Outcome:
    """Ctrl-C once training is under way; the example must then stop with 130 and the resume line."""
    before = log_sizes(logs)  # an earlier campaign's lines in the same logs do not count
    proc, out, err, readers = ws.start(text, cwd)
    deadline = time.monotonic() + timeout
    try:
        while not training_under_way(out, err, logs, before):
            if proc.poll() is not None:
                for r in readers:
                    r.join(timeout=30)
                pytest.fail(f"ended before training was under way\n{Outcome(proc.returncode, ''.join(out), ''.join(err))}")
            if time.monotonic() > deadline:
                pytest.fail(f"no training after {timeout:.0f} s\n{Outcome(-1, ''.join(out), ''.join(err))}")
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)
        result = ws.finish(proc, out, err, readers, timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert result.code == INTERRUPTED_EXIT, result
    assert result.err.rstrip().endswith(INTERRUPTED_MESSAGE), result
    assert "Traceback" not in result.err, result
    return result


def cuda_usable() -> bool:
    import torch

    return torch.cuda.is_available()


# ------------------------------------------------------------------------------------------ prerequisites


def copy_template_export(ws: Workspace) -> None:
    from evaluator.resources import template_dir

    shutil.copytree(template_dir() / "onnx_model", ws.home / "exported" / "onnx_folder", dirs_exist_ok=True)


def keep_first_build(ws: Workspace) -> None:
    """The next example rebuilds submission.tar under another team name: keep this one as another team's."""
    (ws.home / "submissions").mkdir(exist_ok=True)
    shutil.copy(ws.home / "submission.tar", ws.home / "submissions" / "your-team.tar")


def two_submissions(ws: Workspace) -> None:
    shutil.copy(ws.home / "submission.tar", ws.home / "submissions" / "my-lab.tar")


def three_teams(ws: Workspace) -> None:
    """Three archives the examples above built: two team names of my_encoder and the exported ONNX folder."""
    shutil.copy(ws.home / "submissions" / "my-lab.tar", ws.home / "team1.tar")
    shutil.copy(ws.home / "submissions" / "your-team.tar", ws.home / "team2.tar")
    shutil.copy(ws.home / "exported" / "submission.tar", ws.home / "team3.tar")


def signed_run(ws: Workspace) -> Path:
    return min(p for p in ws.home.glob("out/*/demo-a-*/results.json") if (p.parent / "receipt.json").is_file())


def participant_download(ws: Workspace) -> None:
    results = signed_run(ws)
    folder = ws.home / "participant"
    (folder / "downloads").mkdir(parents=True, exist_ok=True)
    shutil.copy(results, folder / "results.json")
    shutil.copy(results.parent / "receipt.json", folder / "downloads" / "receipt.json")
    shutil.copy(ws.home / "organizer.pub", folder / "organizer.pub")


def two_machines(*names: str) -> Callable[[Workspace], None]:
    """The demo run's results as two machines report them (the second scores a little lower)."""
    def make(ws: Workspace) -> None:
        doc = json.loads(signed_run(ws).read_text())
        for i, name in enumerate(names):
            scored = {**doc, "machine": name, "tasks": [{**t, "score": t["score"] * (1 - 0.1 * i)} for t in doc["tasks"]]}
            (ws.home / name).mkdir(exist_ok=True)
            (ws.home / name / "results.json").write_text(json.dumps(scored))
    return make


def three_track_results(ws: Workspace) -> None:
    """One submission's results of tracks A, A-hidden and B, as the three runs' results.json hold them."""
    from evaluator.data import get_track
    from evaluator.scoring import TaskResult, results_document

    hidden = ws.fs("/secure/hidden.yaml")
    for name, track in (("a.json", "A"), ("a-hidden.json", "A-hidden"), ("b.json", "B")):
        spec = get_track(track, hidden_config=hidden)
        tasks = [TaskResult(t.id, spec.name.endswith("hidden"), t.metric, 0.5 + 0.01 * i, 10, machine="m1")
                 for i, t in enumerate(spec.eval_tasks)]
        doc = results_document(submission="logmel-baseline", sha256="ab" * 32, machine="m1", track=track, tasks=tasks)
        (ws.home / name).write_text(json.dumps(doc))


def extraction_shards(ws: Workspace) -> None:
    """Shard files where the extract examples name them: the stand-in ESC-50 shards, copied."""
    esc = ws.home / "xares_data" / "ESC-50"
    shutil.copytree(esc, ws.home / "data" / "ESC-50", dirs_exist_ok=True)
    folds = sorted((esc / "train").glob("*.tar.gz"))
    (ws.home / "shards").mkdir(exist_ok=True)
    for fold in folds:
        shutil.copy(fold, ws.home / "shards" / fold.name)
    for i, fold in enumerate(folds):
        shutil.copy(fold, ws.home / f"x_{i:06d}.tar.gz")
    shutil.copy(folds[0], ws.home / "a.tar.gz")
    shutil.copy(folds[1], ws.home / "b.tar.gz")


def task1_yamls(ws: Workspace) -> None:
    """XARES-LLM's own task1 YAMLs, as a reader who has the reference framework has them."""
    tracks = ROOT / "evaluator" / "data" / "tracks"
    shutil.copy(tracks / "task1_train.yaml", ws.home / "train_task1_config.yaml")
    shutil.copy(tracks / "task1_eval.yaml", ws.home / "eval_task1_config.yaml")


def local_decoder_copy(ws: Workspace) -> None:
    dest = ws.fs("/models/SmolLM2-135M")
    if not dest.is_dir():
        shutil.copytree(ws.root / "smollm2-standin", dest)


def hidden_config_exported(ws: Workspace) -> None:
    """The organizer's setup for the hidden tracks (README: export XARES_HIDDEN_CONFIG=/secure/hidden.yaml)."""
    ws.extra_env["XARES_HIDDEN_CONFIG"] = str(ws.fs("/secure/hidden.yaml"))


def sign_from_now(ws: Workspace) -> None:
    """The organizer's setup once the key exists (README: `--sign-key organizer.key`, or XARES_SIGN_KEY)."""
    ws.extra_env["XARES_SIGN_KEY"] = str(ws.home / "organizer.key")
    ws.organizer = Organizer(ws, [(example, plan) for example, plan in PLANS if plan.lane == "organizer"])


# ---- Ray: a head node on loopback for `--ray auto` (RAY_ADDRESS, as `ray start` tells its users)
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


def start_ray(ws: Workspace) -> None:
    import socket
    import tempfile

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {**ws.env, **RAY_ENV}
    head = subprocess.Popen([str(BIN / "ray"), "start", "--head", f"--port={port}", "--include-dashboard=false",
                             f"--temp-dir={temp}", "--disable-usage-stats", "--block", "--num-cpus=2",
                             f"--memory={16 * 2**30}", "--object-store-memory=80000000"],
                            env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ws.extra_env.update(RAY_ENV, RAY_ADDRESS=f"127.0.0.1:{port}")
    ws.ray = (head, temp)
    check = [sys.executable, "-c", f"import ray; ray.init(address='127.0.0.1:{port}', log_to_driver=False)"]
    deadline = time.monotonic() + 120
    while subprocess.run(check, env=env, capture_output=True, timeout=90).returncode != 0:
        assert head.poll() is None and time.monotonic() < deadline, "the Ray head did not start"
        time.sleep(1)
    shared = ws.fs("/shared/camp")  # the filesystem every node sees holds the campaign folder
    shared.parent.mkdir(parents=True, exist_ok=True)
    if not shared.exists():
        shared.symlink_to(ws.home / "camp")


def stop_ray(ws: Workspace) -> None:
    if ws.ray is None:
        return
    (head, temp), ws.ray = ws.ray, None
    with contextlib.suppress(ProcessLookupError):
        os.killpg(head.pid, signal.SIGKILL)
    head.wait()
    shutil.rmtree(temp, ignore_errors=True)
    for name in (*RAY_ENV, "RAY_ADDRESS"):
        ws.extra_env.pop(name, None)


# ---- cleanup: a Docker engine of the test's own, holding one object of a dead and one of a live evaluator
def start_private_engine(ws: Workspace) -> None:
    from evaluator.sandbox.docker_cleanup import Owner, labels

    base = Path(ws.root.anchor, "tmp") / f"xd{os.getpid()}"  # short: the socket path must fit 107 bytes
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    sock = f"unix://{base}/d.sock"
    # in a network namespace of its own: a second engine on the host's network deletes docker0 (the shared
    # engine's bridge) when it starts; here its bridge and firewall rules are its own
    ws.bridges = host_bridges()
    daemon = subprocess.Popen(["unshare", "--net", "dockerd", "-H", sock, f"--data-root={base}/root",
                               f"--exec-root={base}/exec", f"--pidfile={base}/d.pid"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    ws.engine = (daemon, base)
    ws.extra_env["DOCKER_HOST"] = sock
    import docker

    deadline = time.monotonic() + 60
    while True:
        try:
            client = docker.DockerClient(base_url=sock, timeout=10)
            client.ping()
            break
        except Exception:
            assert daemon.poll() is None and time.monotonic() < deadline, "the private Docker engine did not start"
            time.sleep(0.5)
    me = Owner.current()
    dead = Owner(me.host, 2**22 - 1, 1)  # a pid no process has (above the default pid_max)
    client.volumes.create("xares-docs-dead", labels=labels("output", "docsdead", dead))
    client.volumes.create("xares-docs-live", labels=labels("output", "docslive", me))
    client.close()


def volumes(ws: Workspace) -> set[str]:
    import docker

    client = docker.DockerClient(base_url=ws.extra_env["DOCKER_HOST"], timeout=10)
    try:
        return {v.name for v in client.volumes.list()}
    finally:
        client.close()


def stop_private_engine(ws: Workspace) -> None:
    if ws.engine is None:
        return
    (daemon, base), ws.engine = ws.engine, None
    daemon.terminate()
    try:
        daemon.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(daemon.pid, signal.SIGKILL)
        daemon.wait()
    ws.extra_env.pop("DOCKER_HOST", None)
    subprocess.run(["umount", "-R", str(base)], capture_output=True)
    shutil.rmtree(base, ignore_errors=True)
    lost = ws.bridges - host_bridges()
    assert not lost, f"the private engine removed the host's bridges {sorted(lost)}"


def host_bridges() -> set[str]:
    """The host's bridges (docker0 among them): what a second engine on the host's network would take."""
    return {p.parent.name for p in Path("/sys/class/net").glob("*/bridge")}


# ------------------------------------------------------------------------------------------ checks


def exists(*paths: str) -> Callable[[Workspace, Outcome], None]:
    def check(ws: Workspace, result: Outcome) -> None:
        for p in paths:
            assert Path(p).exists() if p.startswith("/") else any(ws.home.glob(p)), (p, str(result))
    return check


def says(*texts: str) -> Callable[[Workspace, Outcome], None]:
    def check(ws: Workspace, result: Outcome) -> None:
        for t in texts:
            assert t in result.out, (t, str(result))
    return check


def file_says(path: str, text: str) -> Callable[[Workspace, Outcome], None]:
    def check(ws: Workspace, result: Outcome) -> None:
        assert text in (ws.home / path).read_text(), (path, str(result))
    return check


def both(*checks: Callable[[Workspace, Outcome], None]) -> Callable[[Workspace, Outcome], None]:
    def check(ws: Workspace, result: Outcome) -> None:
        for c in checks:
            c(ws, result)
    return check


def all_a_tasks_present(ws: Workspace, result: Outcome) -> None:
    rows = [line.split("\t") for line in result.out.strip().splitlines()]
    header, body = rows[0], rows[1:]
    assert len(body) == 15, result
    for column in (header.index("train data"), header.index("test data")):
        assert all(r[column].startswith("present") for r in body), result


def hidden_tasks_listed(ws: Workspace, result: Outcome) -> None:
    assert "hiddensounds" in result.out and "hiddenspeech" in result.out, result


def leaderboard_ranks_the_demo_run(ws: Workspace, result: Outcome) -> None:
    assert "| 1 | logmel-baseline |" in result.out, result


def the_site_has(title: str, where: str) -> Callable[[Workspace, Outcome], None]:
    def check(ws: Workspace, result: Outcome) -> None:
        page = (ws.home / where if not where.startswith("/") else ws.fs(where)) / "index.html"
        assert title in page.read_text(), page
    return check


def valid_receipt(ws: Workspace, result: Outcome) -> None:
    assert result.out.startswith("ok: "), result


def camp_status(ws: Workspace, result: Outcome) -> None:
    assert "extract/A/" in result.out and "train/" in result.out, result


def cleanup_listed(ws: Workspace, result: Outcome) -> None:
    assert "would remove volume xares-docs-d" in result.out and "kept volume xares-docs-l" in result.out, result
    assert volumes(ws) >= {"xares-docs-dead", "xares-docs-live"}  # a dry run removes nothing


def cleanup_removed_the_dead(ws: Workspace, result: Outcome) -> None:
    left = volumes(ws)
    assert "xares-docs-dead" not in left and "xares-docs-live" in left, (left, str(result))


def cleanup_removed_all(ws: Workspace, result: Outcome) -> None:
    assert "xares-docs-live" not in volumes(ws), result


def train_folder(track: str) -> Callable[[Workspace, Outcome], None]:
    return exists(f"out/*/train-{track}-*")


# ------------------------------------------------------------------------------------------ the plans

SIGNED_RESULTS = "out/mine-0123abcd4567/A-89ef0123abcd/results.json"

PLANS: list[tuple[str, Plan]] = [
    # participants
    ("xares-submit init my_encoder --kind onnx", Plan(check=exists("my_encoder/encoder.py", "my_encoder/manifest.json"))),
    ("xares-submit build my_encoder -o submission.tar", Plan(check=exists("submission.tar"), after=keep_first_build)),
    ("xares-submit build my_encoder -o submission.tar --team my-lab", Plan(check=says("my-lab"))),
    ("xares-submit validate submission.tar", Plan(check=says("submission.tar is valid"))),
    ("xares-eval validate submission.tar", Plan(check=says("submission.tar is valid"))),
    ("xares-submit init my_encoder --kind container", Plan(cwd="container-team", check=exists(
        "container-team/my_encoder/Dockerfile"))),
    ("xares-submit build onnx_folder --source onnx --max-size 1G", Plan(cwd="exported", before=copy_template_export,
                                                                       check=exists("exported/submission.tar"))),
    # the organizer's key; every later run signs its results with it
    ("xares-eval keygen --out organizer", Plan(check=exists("organizer.key", "organizer.pub"), after=sign_from_now)),
    ("xares-eval keygen", Plan(cwd="elsewhere", check=exists("elsewhere/organizer.key", "elsewhere/organizer.pub"))),
    ("xares-eval keygen --out keys/xares26", Plan(check=exists("keys/xares26.key", "keys/xares26.pub"))),
    # tasks and data
    ("xares-eval tasks", Plan(check=says("esc-50", "librispeech"))),
    ("xares-eval tasks --track A --format tsv", Plan(check=all_a_tasks_present)),
    ("xares-eval tasks --track B --data-home /data/xares --format tsv", Plan(check=says("librispeech"))),
    ("xares-eval tasks --hidden-config /secure/hidden.yaml", Plan(check=hidden_tasks_listed)),
    ("xares-eval tasks --hidden-config /secure/hidden.yaml --data-home /data/xares_data",
     Plan(check=hidden_tasks_listed)),
    ("xares-eval demo-data --out xares_data --track demo-a", Plan(check=exists("xares_data/demo-a/demo-a_eval.yaml"))),
    ("xares-eval demo-data --out xares_data", Plan(check=exists("xares_data/demo-b/demo-b_eval.yaml"))),
    ("xares-eval demo-data --out xares_data --track all", Plan(check=exists("xares_data/demo-b/demo-b_eval.yaml"))),
    ("xares-eval demo-data", Plan(check=exists("xares_data/demo-a/demo-a_train.yaml"))),
    ("xares-eval demo-data --out /tmp/demo --track demo-a", Plan(check=lambda ws, r: exists(
        str(ws.fs("/tmp/demo/demo-a/demo-a_eval.yaml")))(ws, r))),
    # the demo (long: interrupted); the decoder it builds first is DIR / PATH below
    ("xares-eval demo", Plan(how="trains", check=exists("demo_out/smoke-decoder/config.json",
                                                         "demo_out/data/demo-a/demo-a_eval.yaml"))),
    ("xares-eval demo --out /tmp/demo --max-steps 300", Plan(lane="organizer", how="trains")),
    # demo-a runs: the first trains and scores; the others are the same run (same bytes, same settings)
    ("xares-eval run submission.tar --track demo-a --offline --decoder DIR",
     Plan(check=both(exists("out/*/demo-a-*/results.json", "out/*/demo-a-*/receipt.json", "out/site/index.html"),
                     leaderboard_ranks_the_demo_run))),
    ("xares-eval run submission.tar --track demo-a --data-home xares_data --decoder PATH",
     Plan(check=leaderboard_ranks_the_demo_run)),
    ("xares-eval run submission.tar --track demo-a --data-home /tmp/demo --offline --decoder DIR",
     Plan(check=leaderboard_ranks_the_demo_run)),
    ("xares-eval run submission.tar --track demo-a --data-home demo_out/data --decoder demo_out/smoke-decoder "
     "--max-steps 600", Plan(check=leaderboard_ranks_the_demo_run)),
    # results: leaderboards, the site, receipts
    ("xares-eval leaderboard out/*/*/results.json", Plan(check=leaderboard_ranks_the_demo_run)),
    ("xares-eval leaderboard out/*/*/results.json --format md", Plan(check=leaderboard_ranks_the_demo_run)),
    ("xares-eval leaderboard a.json a-hidden.json b.json --format tsv -o scores.tsv",
     Plan(before=three_track_results, check=file_says("scores.tsv", "logmel-baseline"))),
    ("xares-eval leaderboard machine1/results.json machine2/results.json --format html -o board.html",
     Plan(before=two_machines("machine1", "machine2"), check=file_says("board.html", "logmel-baseline"))),
    ("xares-eval leaderboard m1/results.json m2/results.json --format html -o board.html",
     Plan(before=two_machines("m1", "m2"), check=file_says("board.html", "logmel-baseline"))),
    ("xares-eval report out/*/*/results.json -o site/", Plan(check=the_site_has("demo-a", "site"))),
    ("xares-eval report out/*/*/results.json -o /var/www/xares --title 'Interspeech 2026 challenge'",
     Plan(check=the_site_has("Interspeech 2026 challenge", "/var/www/xares"))),
    (f"xares-eval verify {SIGNED_RESULTS} --key organizer.pub", Plan(check=valid_receipt)),
    ("xares-eval verify results.json --key organizer.pub --receipt downloads/receipt.json",
     Plan(cwd="participant", before=participant_download, check=valid_receipt)),
    # the feature store on its own
    ("xares-eval extract submission.tar --data 'data/ESC-50/test/*.tar.gz' --out features/",
     Plan(before=extraction_shards, check=exists("features/*"))),
    ("xares-eval extract submission.tar --data 'shards/*.tar.gz' --out features/", Plan(check=exists("features/*"))),
    ("xares-eval extract submission.tar --data 'shards/esc50_fold_{1..4}_0000000.tar.gz' --out features/",
     Plan(check=exists("features/*"))),
    ("xares-eval extract submission.tar --data 'x_0000{00..03}.tar.gz' --out features/ --dtype float32",
     Plan(check=exists("features/*"))),
    ("xares-eval extract submission.tar --data 'x_0000{00..03}.tar.gz' --out features/ --spot-check 0.02",
     Plan(check=exists("features/*"))),
    ("xares-eval extract submission.tar --data a.tar.gz --data b.tar.gz --out features/ --task esc-50 --split train "
     "--spot-check 0.02", Plan(check=exists("features/*"))),
    # the official tracks (100,000 steps: interrupted once training is under way)
    ("xares-eval run submission.tar --track A", Plan(lane="organizer", how="trains", check=train_folder("A"))),
    ("xares-eval run submission.tar --track A --device cpu --threads 8", Plan(lane="organizer", how="trains")),
    ("xares-eval run submission.tar --track A --sign-key organizer.key", Plan(lane="organizer", how="trains")),
    ("xares-eval run submission.tar --track A --decoder /models/SmolLM2-135M --max-steps 20000 --out out/",
     Plan(lane="organizer", how="trains", before=local_decoder_copy)),
    ("xares-eval run submission.tar --track A --device cuda", Plan(lane="organizer", how="cuda")),
    ("xares-eval run submission.tar --track A --device cuda --precision bf16", Plan(lane="organizer", how="cuda")),
    ("xares-eval run submissions/*.tar --track A --pack auto", Plan(lane="organizer", how="trains", before=two_submissions)),
    ("xares-eval run submissions/*.tar --track A --pack auto --device cuda", Plan(lane="organizer", how="cuda")),
    ("xares-eval run team1.tar team2.tar team3.tar --track A --pack auto", Plan(lane="organizer", how="trains", before=three_teams)),
    ("xares-eval run team1.tar team2.tar team3.tar --track B --pack 8", Plan(lane="organizer", how="trains", check=train_folder("B"))),
    ("xares-eval run submission.tar --track B-hidden --hidden-config /secure/hidden.yaml", Plan(lane="organizer", how="trains")),
    ("xares-eval run submission.tar --train-config train_task1_config.yaml --eval-config eval_task1_config.yaml",
     Plan(lane="organizer", how="trains", before=task1_yamls)),
    ("xares-eval run submission.tar --train-config train_task1_config.yaml --eval-config eval_task1_config.yaml "
     "--max-steps 2000", Plan(lane="organizer", how="trains")),
    # the campaign (every track; interrupted once a decoder trains)
    ("xares-eval campaign submissions/*.tar --tracks A,A-hidden,B,B-hidden --out camp/",
     Plan(lane="organizer", how="trains", logs="camp/logs", before=hidden_config_exported)),
    ("xares-eval campaign submissions/*.tar --out camp/", Plan(lane="organizer", how="trains", logs="camp/logs")),
    ("xares-eval campaign submissions/*.tar --tracks A,A-hidden,B,B-hidden --out camp/ --pack auto",
     Plan(lane="organizer", how="trains", logs="camp/logs")),
    ("xares-eval campaign submissions/*.tar --out camp/ --jobs 2", Plan(lane="organizer", how="trains", logs="camp/logs")),
    ("xares-eval campaign status camp/", Plan(lane="organizer", check=camp_status)),
    ("xares-eval campaign submissions/*.tar --out /shared/camp/ --ray auto",
     Plan(lane="organizer", how="trains", logs="camp/logs", before=start_ray, after=stop_ray)),
    # cleanup, on an engine of its own
    ("xares-eval cleanup --dry-run", Plan(before=start_private_engine, check=cleanup_listed)),
    ("xares-eval cleanup", Plan(check=cleanup_removed_the_dead)),
    ("xares-eval cleanup --all", Plan(check=cleanup_removed_all, after=stop_private_engine)),
]


# ------------------------------------------------------------------------------------------ the tests


def test_every_example_has_a_plan():
    planned = [key(example) for example, _ in PLANS]
    assert len(planned) == len(set(planned)), "an example is planned twice"
    missing = sorted(set(SHOWN) - set(planned))
    stale = sorted(set(planned) - set(SHOWN))
    assert not missing, "examples shown without a plan here:\n" + "\n".join(f"  {m}  ({SHOWN[m][1]})" for m in missing)
    assert not stale, "planned examples no longer shown anywhere:\n" + "\n".join(stale)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """The reader's machine before the first example: stand-ins for downloads, nothing else."""
    from evaluator.smoke_decoder import build_smoke_decoder

    root = tmp_path_factory.mktemp("reader")
    space = Workspace(root=root, env={})
    space.home.mkdir()
    hidden = write_hidden_config(space.fs("/secure/hidden.yaml"), space.fs("/secure/shards"))
    write_track_shards(("A", "B", "A-hidden", "B-hidden"), space.home / "xares_data", hidden_config=hidden)
    decoder = build_smoke_decoder(["yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go"],
                                  root / "smollm2-standin", steps=20, progress=False)
    install_in_hub_cache(decoder, root / "hf")
    keep = {k: v for k, v in os.environ.items()
            if not k.startswith(("XARES_", "HF_", "TRANSFORMERS_", "RAY_", "DOCKER_HOST"))}
    space.env = {**keep, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "HF_HOME": str(root / "hf"),
                 "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "XARES_PROGRESS_SECONDS": "1"}
    yield space
    if space.organizer is not None:
        space.organizer.thread.join(timeout=900)
    stop_ray(space)  # after a failed example: nothing of the test's may outlive it
    stop_private_engine(space)


@pytest.mark.parametrize("example, plan", PLANS, ids=[e[:90] for e, _ in PLANS])
def test_example_runs_as_documented(ws, example, plan):
    if plan.lane == "organizer":
        assert ws.organizer is not None, "the organizer's lane starts with `xares-eval keygen --out organizer`"
        error = ws.organizer.outcome(key(example))
        if error is not None:
            raise error
        return
    execute(ws, example, plan)


def execute(ws: Workspace, example: str, plan: Plan) -> None:
    """Run one example by its plan; fails (raises) as the plan says."""
    text = ws.shell_text(SHOWN.get(key(example), (example, ""))[0], placeholders(ws, example))
    cwd = ws.home / plan.cwd
    if plan.before:
        plan.before(ws)
    try:
        if plan.how == "cuda" and not cuda_usable():
            started = time.monotonic()
            result = ws.finish(*ws.start(text, cwd), timeout=120)
            assert result.code == 3 and "CUDA" in result.err, result
            assert time.monotonic() - started < 60, "a missing GPU must be reported before any work"
            return
        if plan.how in ("trains", "cuda"):
            result = run_until_training(ws, text, cwd, ws.home / plan.logs if plan.logs else None)
        else:
            result = run_done(ws, text, cwd)
        if plan.check:
            plan.check(ws, result)
    finally:
        if plan.after:
            plan.after(ws)


class Organizer:
    """The official-track, campaign and Ray examples, run in order by a thread of their own beside the
    reader's examples (the machine has two cores, and most of their time is interpreter start-up); it
    starts once what they need exists (the archives, the organizer's key), and each of their tests waits
    for its example's outcome here. Its setup (hidden config, Ray) is its own: `Workspace.extra_env`."""

    def __init__(self, ws: Workspace, plans: list[tuple[str, Plan]]):
        ws.lanes["organizer"] = dict(ws.lanes["reader"])
        self.done: dict[str, threading.Event] = {key(e): threading.Event() for e, _ in plans}
        self.errors: dict[str, BaseException | None] = {}
        self.thread = threading.Thread(target=self._run, args=(ws, plans), name="organizer", daemon=True)
        self.thread.start()

    def _run(self, ws: Workspace, plans: list[tuple[str, Plan]]) -> None:
        for example, plan in plans:
            try:
                execute(ws, example, plan)
                self.errors[key(example)] = None
            except BaseException as e:  # noqa: BLE001 - pytest.fail's Failed too: handed to the example's test
                self.errors[key(example)] = e
            self.done[key(example)].set()

    def outcome(self, example: str, timeout: float = 540) -> BaseException | None:
        if not self.done[example].wait(timeout):
            pytest.fail(f"the organizer's lane did not reach this example within {timeout:.0f} s")
        return self.errors[example]


def placeholders(ws: Workspace, example: str) -> dict[str, str]:
    """The verify example names a run folder by placeholder hashes: the reader's own signed run."""
    if SIGNED_RESULTS in example:
        return {SIGNED_RESULTS: str(signed_run(ws).relative_to(ws.home))}
    return {}


def test_the_typical_use_blocks_run_first_in_the_order_shown():
    """What a new user types first (`xares-submit --help`, `xares-eval --help`) runs in that order here,
    before anything else the later examples leave behind."""
    from test_cli_examples import examples_in_help

    from evaluator.cli import eval_cli, submit_cli

    order = [key(example) for example, _ in PLANS]
    for block in (examples_in_help(submit_cli.help), examples_in_help(eval_cli.help)):
        at = [order.index(key(example)) for example in block]
        assert at == sorted(at), block
    assert order.index(key(examples_in_help(submit_cli.help)[-1])) < 5
