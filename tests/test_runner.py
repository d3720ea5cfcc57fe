"""`xares-eval run` end to end on a downsampled demo track: the real template encoder (ONNX), real
generated shards, a real (tiny) transformers decoder. Checks keys, reuse, failure reporting and exit codes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import demo_a_world

from evaluator.cli import eval_cli
from evaluator.data import get_track, iter_clips
from evaluator.errors import SubmissionError
from evaluator.resources import schema_errors, template_dir
from evaluator.runner import RunOptions, run_submission

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from evaluator.submission.build import build

    root = tmp_path_factory.mktemp("run")
    shutil.copytree(template_dir() / "onnx", root / "encoder")
    build(root / "encoder", root / "submission.tar")
    data_home, track = demo_a_world(root, decoder_steps=60)
    return root, data_home, track


def _opts(root: Path, data_home: Path, **kw) -> RunOptions:
    base = dict(out=root / "out", decoder=str(root / "decoder"), max_steps=8, data_home=data_home,
                download=False, limit_clips=6, progress=False, machine="test", max_new_tokens=12,
                checkpoint_every=4)
    base.update(kw)
    return RunOptions(**base)


def test_run_writes_schema_valid_results_and_keyed_outputs(world):
    root, data_home, track = world
    lines: list[str] = []
    outcome = run_submission(root / "submission.tar", track, _opts(root, data_home), echo=lines.append)
    doc = json.loads(outcome.results_path.read_text())
    assert schema_errors(doc, "results") == []
    assert doc["track"] == "demo-a" and doc["machine"] == "test"
    assert doc["config"]["device"].startswith("cpu") and "cuda" not in doc["config"]["device"]
    assert json.loads((outcome.run_dir / "config.json").read_text())["device"] == doc["config"]["device"]
    assert sorted(t["task"] for t in doc["tasks"]) == sorted(t.id for t in track.eval_tasks)
    assert all(t["status"] == "ok" and t["n_samples"] == 6 for t in doc["tasks"])
    # predictions carry sample ids and references, in data order
    for task in track.eval_tasks:
        rows = [json.loads(x) for x in (outcome.run_dir / "predictions" / f"{task.id}.jsonl").read_text().splitlines()]
        keys = [c.key for c in iter_clips(task, "test", data_home=data_home, limit=6)]
        assert [r["id"] for r in rows] == keys
        assert all(r["references"] for r in rows)
        # and each reference's row in the reference's own predictions file: a permutation of its rows
        assert all(len(r["ref_index"]) == len(r["references"]) for r in rows)
        assert sorted(i for r in rows for i in r["ref_index"]) == list(range(sum(len(r["references"]) for r in rows)))
    assert (outcome.run_dir / "scores.tsv").read_text().startswith("rank\tsubmission")
    assert (outcome.run_dir / "run.log").exists()
    assert any("probe: 8 checks passed" in line for line in lines)


def test_rerun_reuses_everything_and_changed_steps_do_not(world, monkeypatch):
    root, data_home, track = world
    first = run_submission(root / "submission.tar", track, _opts(root, data_home), echo=lambda s: None)
    lines: list[str] = []
    from evaluator.generation import Generator

    def not_needed(self):
        raise AssertionError("every prediction is cached: the generation engine must not be opened")

    def no_encoder(*args):
        raise AssertionError("the probe and the spot check passed before: the encoder must not be started")

    with monkeypatch.context() as m:
        m.setattr(Generator, "__enter__", not_needed)
        m.setattr("evaluator.runner.open_runtime", no_encoder)
        m.chdir(root)  # the same decoder folder named another way is the same decoder: nothing is redone
        again = run_submission(root / "submission.tar", track, _opts(root, data_home, decoder="./decoder/"),
                               echo=lines.append)
    assert again.run_dir == first.run_dir
    assert again.document["tasks"] == first.document["tasks"]
    assert any("checks passed before" in line for line in lines)
    assert any("spot check passed before" in line for line in lines)
    assert sum("0 encoder calls" in line for line in lines) == 2 * len(track.train_tasks)  # train + test stores
    assert any("reused the finished checkpoint" in line for line in lines)

    changed = run_submission(root / "submission.tar", track, _opts(root, data_home, max_steps=10),
                             echo=lambda s: None)
    assert changed.run_dir != first.run_dir
    train_dirs = sorted(p.name for p in first.run_dir.parent.glob("train-*"))
    assert len(train_dirs) == 2  # a new decoder for the new step count; the old one is untouched


def test_a_task_with_missing_data_fails_alone(world, tmp_path):
    root, data_home, track = world
    broken_home = tmp_path / "data"
    shutil.copytree(data_home, broken_home)
    victim = track.eval_tasks[0]
    for shard in (broken_home / "demo-a").rglob("*.tar*"):
        if "test" in shard.name and victim.id.split("-")[-1] in str(shard):
            shard.unlink()
    broken = get_track("demo-a", data_home=broken_home)
    lines: list[str] = []
    outcome = run_submission(root / "submission.tar", broken, _opts(root, broken_home, out=tmp_path / "out"),
                             echo=lines.append)
    status = {t["task"]: t["status"] for t in outcome.document["tasks"]}
    assert status[victim.id] == "failed"
    assert [s for t, s in status.items() if t != victim.id] == ["ok"] * (len(status) - 1)
    failed = next(t for t in outcome.document["tasks"] if t["task"] == victim.id)
    assert failed["score"] == 0 and "missing" in failed["error"]


def test_the_sample_list_follows_the_reference_end_to_end(world, tmp_path):
    """Corrupt texts leave the test set (a clip whose only text is corrupt goes), the reasons are named."""
    import io

    import numpy as np
    import soundfile as sf

    from evaluator.data import load_xares_yaml, write_shard

    root, _, _ = world

    def wav(freq):
        buf = io.BytesIO()
        sf.write(buf, (0.3 * np.sin(2 * np.pi * freq * np.arange(8000) / 16000)).astype(np.float32), 16000,
                 format="WAV")
        return buf.getvalue()

    def shard(path, docs):
        members = []
        for i, doc in enumerate(docs):
            members += [(f"c{i}.wav", wav(300 + 50 * i)), (f"c{i}.json", json.dumps(doc).encode())]
        return str(write_shard(path, members))

    train = shard(tmp_path / "train.tar", [{"label": "high" if i % 2 else "low"} for i in range(8)])
    test = shard(tmp_path / "test.tar", [{"label": "low"}, {"label": "!!!???"}, {"other": "x"},
                                         {"label": ["high", "[__] [__]"]}, {"label": "high"}, {"label": ""}])
    (tmp_path / "train.yaml").write_text(json.dumps({"max_steps": 2, "train_data": {
        "Tones": {"prompt": "Which tone?", "data": [train], "key": "label"}}}))
    (tmp_path / "eval.yaml").write_text(json.dumps({"eval_tones": {
        "data": {"data": [test], "key": "label", "prompt": "Which tone?"}, "metric": "Accuracy"}}))
    track = load_xares_yaml(tmp_path / "train.yaml", tmp_path / "eval.yaml")
    lines: list[str] = []
    outcome = run_submission(root / "submission.tar", track, _opts(root, tmp_path, out=tmp_path / "out", limit_clips=None),
                             echo=lines.append)
    assert any("tones: " in ln and "(skipped: 2 corrupt text, 1 missing label)" in ln for ln in lines), lines
    [task] = outcome.document["tasks"]
    assert task["status"] == "ok" and task["n_samples"] == 4  # c1 (only a corrupt text) and c2 (no label) are gone
    rows = [json.loads(x) for x in (outcome.run_dir / "predictions" / "tones.jsonl").read_text().splitlines()]
    assert [(r["id"].split("/")[-1], r["references"]) for r in rows] == [
        ("c0", ["low"]), ("c3", ["high"]), ("c4", ["high"]), ("c5", [""])]
    assert sorted(i for r in rows for i in r["ref_index"]) == [0, 1, 2, 3]


def _onnx_submission(folder: Path, out: Path, **model) -> Path:
    """A submission.tar of a tiny onnx.helper encoder (tests/resources), built with the real build."""
    from resources.encoders.onnx_models import make_onnx

    from evaluator.submission.build import BuildOptions, build

    folder.mkdir(parents=True)
    make_onnx(folder / "model.onnx", **model)
    (folder / "manifest.json").write_text(json.dumps({"name": folder.name, "team": "tests"}))
    build(folder, out, BuildOptions(source="onnx"))
    return out


def _store_dtypes(out: Path) -> set[str]:
    return {json.loads(p.read_text())["dtype"] for p in (out / "features").glob("*/key.json")}


class TestMeasuredEncoders:
    """What the probe measured decides how `run` extracts and stores; nothing that validates fails on it."""

    def test_large_outputs_are_stored_in_float32_and_run(self, world, tmp_path):
        root, data_home, track = world
        tar = _onnx_submission(tmp_path / "loud", tmp_path / "loud.tar", gain=3e4)
        outcome = run_submission(tar, track, _opts(root, data_home, out=tmp_path / "out"), echo=lambda s: None)
        assert all(t["status"] == "ok" for t in outcome.document["tasks"])
        assert _store_dtypes(tmp_path / "out") == {"float32"}

    def test_data_louder_than_the_probe_is_redone_in_float32(self, world, tmp_path, monkeypatch):
        import evaluator.submission.probe as probe

        root, data_home, track = world
        tar = _onnx_submission(tmp_path / "loud", tmp_path / "loud.tar", gain=1e6)
        monkeypatch.setattr(probe, "RANGE_MARGIN", 0.0)  # the probe now says float16 fits: data proves it wrong
        lines: list[str] = []
        outcome = run_submission(tar, track, _opts(root, data_home, out=tmp_path / "out"), echo=lines.append)
        assert all(t["status"] == "ok" for t in outcome.document["tasks"])
        assert any("beyond float16's range" in x and "storing this split as float32" in x for x in lines)
        assert "float32" in _store_dtypes(tmp_path / "out")
        # an explicit dtype is the organizer's choice: it fails instead of silently changing
        with pytest.raises(SubmissionError, match="beyond float16"):
            run_submission(tar, track, _opts(root, data_home, out=tmp_path / "out2", feature_dtype="float16"),
                           echo=lambda s: None)

    def test_padding_sensitive_encoder_runs_unpadded(self, world, tmp_path):
        root, data_home, track = world
        tar = _onnx_submission(tmp_path / "norm", tmp_path / "norm.tar", ignores_mask=True)
        lines: list[str] = []
        outcome = run_submission(tar, track, _opts(root, data_home, out=tmp_path / "out"), echo=lines.append)
        assert all(t["status"] == "ok" for t in outcome.document["tasks"])
        assert any("padding changes this encoder's frames" in x and "equal length" in x for x in lines)
        settings = [json.loads(p.read_text())["settings"] for p in (tmp_path / "out" / "features").glob("*/key.json")]
        assert settings and all(s.get("batching") == "equal_length" for s in settings)


class TestCli:
    def test_broken_tar_is_one_line_exit_1(self, tmp_path):
        bad = tmp_path / "submission.tar"
        bad.write_bytes(b"this is not a tar archive")
        result = CliRunner().invoke(eval_cli, ["run", str(bad), "--track", "demo-a", "--out", str(tmp_path / "o")])
        assert result.exit_code == 1, result.output
        errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and "not a readable tar archive" in errors[0]
        assert result.output.rstrip().endswith(errors[0]) and "Traceback" not in result.output

    def test_no_track_is_a_usage_error(self, tmp_path):
        tar = tmp_path / "s.tar"
        tar.write_bytes(b"x")
        result = CliRunner().invoke(eval_cli, ["run", str(tar)])
        assert result.exit_code == 2 and "--track" in result.output

    def test_xares_yaml_files_run_unchanged_and_their_training_fields_count(self, world, tmp_path):
        root, data_home, _ = world
        train_yaml, eval_yaml = data_home / "demo-a" / "demo-a_train.yaml", data_home / "demo-a" / "demo-a_eval.yaml"
        yaml_lr = __import__("yaml").safe_load(train_yaml.read_text())["learning_rate"]
        result = CliRunner().invoke(eval_cli, [
            "run", str(root / "submission.tar"), "--train-config", str(train_yaml), "--eval-config", str(eval_yaml),
            "--decoder", str(root / "decoder"), "--max-steps", "4", "--limit-clips", "4", "--offline",
            "--out", str(tmp_path / "out"), "--quiet"])
        assert result.exit_code == 0, result.output
        (results,) = (tmp_path / "out").glob("*/custom-*/results.json")
        assert json.loads(results.read_text())["track"] == "custom"
        (train_json,) = (tmp_path / "out").glob("*/train-custom-*/train.json")
        trained = json.loads(train_json.read_text())["train"]
        assert trained["learning_rate"] == yaml_lr and trained["max_steps"] == 4  # YAML field; CLI override

    def test_b_hidden_is_scored_with_the_track_b_decoder(self, world, tmp_path):
        """B-hidden has no training data of its own: the run trains (or reuses) Track B's decoder, so
        without Track B's shards it stops before training, naming them."""
        root, data_home, _ = world
        hidden = tmp_path / "hidden.yaml"
        hidden.write_text(f"B-hidden:\n  eval: {data_home / 'demo-a' / 'demo-a_eval.yaml'}\n")
        result = CliRunner().invoke(eval_cli, [
            "run", str(root / "submission.tar"), "--track", "B-hidden", "--hidden-config", str(hidden),
            "--decoder", str(root / "decoder"), "--data-home", str(tmp_path / "empty"), "--offline",
            "--out", str(tmp_path / "out"), "--quiet"])
        assert result.exit_code == 1, result.output
        assert "LibriSpeech/train" in result.output or "AISHELL-1/train" in result.output, result.output
        assert "Traceback" not in result.output

    def test_a_missing_decoder_stops_the_run_before_any_extraction(self, world, tmp_path):
        root, data_home, _ = world
        result = CliRunner().invoke(eval_cli, [
            "run", str(root / "submission.tar"), "--track", "demo-a", "--data-home", str(data_home),
            "--decoder", str(tmp_path / "no-decoder"), "--out", str(tmp_path / "out"), "--quiet"])
        assert result.exit_code == 2 and "decoder directory" in result.output  # a wrong option, not a bad submission
        assert "Extracting" not in result.output and not (tmp_path / "out").exists()

    @pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks a machine without CUDA")
    def test_a_missing_gpu_stops_the_run_before_any_extraction(self, world, tmp_path):
        root, data_home, _ = world
        result = CliRunner().invoke(eval_cli, [
            "run", str(root / "submission.tar"), "--track", "demo-a", "--data-home", str(data_home),
            "--decoder", str(root / "decoder"), "--device", "cuda", "--out", str(tmp_path / "out"), "--quiet"])
        assert result.exit_code == 3, result.output
        errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and "--device cuda" in errors[0] and "use --device cpu" in errors[0]
        assert "Extracting" not in result.output and not (tmp_path / "out").exists()

    @pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks a machine without CUDA")
    def test_demo_on_a_missing_gpu_stops_before_any_work(self, tmp_path):
        result = CliRunner().invoke(eval_cli, ["demo", "--out", str(tmp_path / "demo"), "--device", "cuda:1", "--quiet"])
        assert result.exit_code == 3 and "--device cuda:1" in result.output, result.output
        assert not (tmp_path / "demo").exists()

    def test_run_cli_prints_table(self, world):
        root, data_home, _ = world
        result = CliRunner().invoke(eval_cli, [
            "run", str(root / "submission.tar"), "--track", "demo-a", "--data-home", str(data_home),
            "--decoder", str(root / "decoder"), "--max-steps", "8", "--limit-clips", "6", "--offline",
            "--out", str(root / "out"), "--quiet", "--machine", "test"])
        assert result.exit_code == 0, result.output
        assert "| rank |" in result.output and "Results:" in result.output


def test_a_run_killed_mid_training_resumes_to_the_same_result(world, tmp_path):
    """SIGKILL after the first checkpoint, rerun: same predictions and scores as an uninterrupted run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    root, data_home, _ = world
    args = [sys.executable, "-m", "evaluator", "run", str(root / "submission.tar"), "--track", "demo-a",
            "--data-home", str(data_home), "--decoder", str(root / "decoder"), "--max-steps", "60",
            "--checkpoint-every", "10", "--limit-clips", "6", "--offline", "--quiet", "--machine", "test",
            "--threads", "1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    killed = subprocess.Popen([*args, "--out", str(tmp_path / "a")], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while not list((tmp_path / "a").glob("*/train-*/checkpoint-00000010")):
        assert killed.poll() is None, "the run ended before its first checkpoint"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    assert not list((tmp_path / "a").glob("*/*/results.json"))

    resumed = subprocess.run([*args, "--out", str(tmp_path / "a")], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from step" in resumed.stdout
    straight = subprocess.run([*args, "--out", str(tmp_path / "b")], env=env, capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr

    def outputs(out):
        (run_dir,) = [p.parent for p in out.glob("*/*/results.json")]
        doc = json.loads((run_dir / "results.json").read_text())
        preds = {p.name: p.read_text() for p in sorted((run_dir / "predictions").glob("*.jsonl"))}
        return run_dir.name, [(t["task"], t["score"]) for t in doc["tasks"]], preds

    assert outputs(tmp_path / "a") == outputs(tmp_path / "b")


def test_demo_command_runs_both_tracks_and_prints_chance(tmp_path):
    """`make demo`'s command end to end, shortened: a leaderboard row per track and a chance line per task."""
    result = CliRunner().invoke(eval_cli, ["demo", "--out", str(tmp_path / "demo"), "--max-steps", "4",
                                           "--decoder-steps", "5", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "| 1 | logmel-baseline |" in result.output and "NOT SmolLM2" in result.output
    tail = result.output.split("Chance level of each task")[1]
    chance = [line for line in tail.splitlines() if line.startswith("  - demo-")]
    assert len(chance) == 5 and all(line.split()[-1].replace(".", "").isdigit() for line in chance)
    site = tmp_path / "demo" / "site" / "index.html"
    assert f"Site: {site}" in result.output and "Track demo-b" in site.read_text()


# ---- several submissions in packs (issue 12) --------------------------------------------------------
@pytest.fixture(scope="module")
def second(world):
    """Another encoder: the baseline at half the bands (D = 40) and half the frame rate (25 frames/s)."""
    from evaluator.submission.build import build

    root = world[0]
    folder = root / "encoder40"
    shutil.copytree(template_dir() / "onnx", folder)
    source = (folder / "encoder.py").read_text()
    (folder / "encoder.py").write_text(source.replace("N_MELS = 80", "N_MELS = 40").replace("HOP = 320", "HOP = 640"))
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**manifest, "name": "logmel-40"}))
    build(folder, root / "submission40.tar")
    return root / "submission40.tar"


def _losses(train_dir: Path) -> list[float]:
    import torch

    latest = sorted(train_dir.glob("checkpoint-*"))[-1]
    return torch.load(latest / "state.pt", weights_only=True)["losses"].tolist()


def _rows(run_dir: Path, task: str) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "predictions" / f"{task}.jsonl").read_text().splitlines()]


def test_a_packed_run_gives_each_submission_its_separate_run(world, second, tmp_path, monkeypatch):
    from evaluator import generation
    from evaluator.runner import run_submissions

    root, data_home, track = world
    tars = [root / "submission.tar", second]
    packed_lines: list[str] = []
    packed = run_submissions(tars, track, _opts(root, data_home, out=tmp_path / "packed", max_steps=12), pack=2,
                             echo=packed_lines.append)
    assert all(b.error is None for b in packed), [b.error for b in packed]
    assert any("Training 2 decoders together" in line for line in packed_lines)
    solo = [run_submission(t, track, _opts(root, data_home, out=tmp_path / "solo", max_steps=12), echo=lambda s: None)
            for t in tars]
    for together, alone in zip(packed, solo):
        together = together.outcome
        # the same folders and keys: a packed run and separate runs are interchangeable
        assert together.run_dir.relative_to(tmp_path / "packed") == alone.run_dir.relative_to(tmp_path / "solo")
        train_dir = together.document["config"]["train_dir"]
        assert train_dir == alone.document["config"]["train_dir"]
        a, b = _losses(alone.run_dir.parent / train_dir), _losses(together.run_dir.parent / train_dir)
        assert len(a) == 12 and max(abs(x - y) / abs(x) for x, y in zip(a, b)) < 1e-5
        for task in track.eval_tasks:  # the same answers, sample by sample
            assert _rows(together.run_dir, task.id) == _rows(alone.run_dir, task.id)
        assert [(t["task"], t["score"]) for t in together.document["tasks"]] == \
            [(t["task"], t["score"]) for t in alone.document["tasks"]]
    # each reuses the other's finished work: no training step, no decoding
    monkeypatch.setattr(generation.Generator, "generate", lambda *a, **k: pytest.fail("decoded again"))
    monkeypatch.setattr(generation.PackedGenerator, "generate_many", lambda *a, **k: pytest.fail("decoded again"))
    lines: list[str] = []
    again = run_submission(tars[1], track, _opts(root, data_home, out=tmp_path / "packed", max_steps=12),
                           echo=lines.append)
    assert any("reused the finished checkpoint" in line for line in lines)
    assert again.document["tasks"] == packed[1].outcome.document["tasks"]
    lines = []
    both = run_submissions(tars, track, _opts(root, data_home, out=tmp_path / "solo", max_steps=12), pack=2,
                           echo=lines.append)
    assert sum("reused the finished checkpoint" in line for line in lines) == 2
    assert [b.outcome.document["tasks"] for b in both] == [s.document["tasks"] for s in solo]


def test_the_cli_runs_several_submissions_and_reports_each_failure(world, second, tmp_path):
    root, data_home, _ = world
    broken = tmp_path / "broken.tar"
    broken.write_bytes(b"not a tar at all")
    args = ["run", str(root / "submission.tar"), str(broken), str(second), "--track", "demo-a",
            "--data-home", str(data_home), "--decoder", str(root / "decoder"), "--max-steps", "4",
            "--limit-clips", "4", "--offline", "--out", str(tmp_path / "out"), "--quiet", "--spot-check", "0"]
    result = CliRunner().invoke(eval_cli, args + ["--pack", "auto"])
    assert result.exit_code == 1, result.output
    assert "--pack auto: " in result.output and "Training 2 decoders together" in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert errors[0].startswith("error: broken.tar: ") and "not a readable tar archive" in errors[0]
    assert errors[-1] == "error: 1 of 3 submissions failed" and "Traceback" not in result.output
    assert len(list((tmp_path / "out").glob("*/demo-a-*/results.json"))) == 2
    # --pack 1 runs them one after the other, each exactly as alone: everything is reused here
    result = CliRunner().invoke(eval_cli, args + ["--pack", "1"])
    assert result.exit_code == 1 and result.output.count("reused the finished checkpoint") == 2, result.output
    for bad in ("0", "many"):
        result = CliRunner().invoke(eval_cli, args + ["--pack", bad])
        assert result.exit_code == 2 and "--pack must be 'auto' or a positive number" in result.output
