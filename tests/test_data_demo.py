"""Demo tracks (espeak-ng + sox) and the `xares-eval tasks` / `demo-data` commands."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from evaluator.cli import eval_cli
from evaluator.data import SkipReport, generate_demo, get_track, iter_clips, shard_digests

pytestmark = pytest.mark.skipif(
    shutil.which("espeak-ng") is None or shutil.which("sox") is None, reason="espeak-ng and sox are needed"
)


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    for track in ("demo-a", "demo-b"):
        generate_demo(track, root / track)
    return root


def tree_digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


class TestDemoTracks:
    def test_demo_a_shape(self, home):
        track = get_track("demo-a", data_home=home)
        assert len(track.tasks) >= 3 and {"Accuracy", "mAP"} <= {t.metric for t in track.tasks}
        sounds = track.task("demo-sounds")
        assert sounds.metric_args == {"num_classes": 4}
        labels = {c.targets[0] for c in iter_clips(sounds, "test", data_home=home)}
        assert any(";" in lab for lab in labels)  # genuinely multi-label

    def test_demo_b_shape(self, home):
        track = get_track("demo-b", data_home=home)
        assert [t.metric for t in track.tasks] == ["iWER", "iWER"]
        words = " ".join(c.targets[0] for c in iter_clips(track.task("demo-sentences"), "test", data_home=home))
        assert len(set(words.split())) <= 10  # small vocabulary

    @pytest.mark.parametrize("name", ["demo-a", "demo-b"])
    def test_every_clip_reads_cleanly(self, home, name):
        for task in get_track(name, data_home=home).tasks:
            for split, (lo, hi) in (("train", (60, 120)), ("test", (24, 40))):
                report = SkipReport()
                clips = list(iter_clips(task, split, data_home=home, report=report))
                assert report.skipped == 0 and not report.counts
                assert lo <= len(clips) <= hi, (task.id, split, len(clips))
                assert all(0.5 <= len(c.audio) / 16000 <= 3.0 for c in clips), task.id
                classes = {c.targets for c in clips}
                # small label sets: 3-6 classes; 4 sounds in 10 mixtures; 3x3x3 sentences of a 10-word vocabulary
                most = {"demo-sounds": 10, "demo-sentences": 27}.get(task.id, 6)
                assert 3 <= len(classes) <= most, (task.id, classes)


class TestCli:
    def test_tasks_lists_every_track(self, home, monkeypatch):
        monkeypatch.delenv("XARES_HIDDEN_CONFIG", raising=False)
        result = CliRunner().invoke(eval_cli, ["tasks", "--data-home", str(home), "--format", "json"])
        assert result.exit_code == 0, result.output
        rows = json.loads(result.output)
        per_track = {}
        for r in rows:
            per_track.setdefault(r["track"], []).append(r)
        assert {k: len(v) for k, v in per_track.items()} == {
            "A": 15, "A-hidden": 6, "B": 5, "B-hidden": 4, "demo-a": 3, "demo-b": 2
        }
        esc = next(r for r in rows if r["task"] == "esc-50")
        assert esc["metric"] == "Accuracy" and esc["test data"] == "missing 1 of 1 shard files"
        assert next(r for r in rows if r["task"] == "fsd50k")["metric"] == "mAP num_classes=200"
        assert all(r["test data"] == "hidden-config not given" for r in per_track["B-hidden"])
        assert all(r["test data"] == "present (1 shard)" for r in per_track["demo-a"])

    def test_tasks_table_and_hidden_config(self, home, tmp_path):
        cfg = tmp_path / "hidden.yaml"
        cfg.write_text(
            "B-hidden:\n  eval:\n    eval_tacos:\n      data:\n        data: ['tacos/test_{0..2}.tar']\n"
            "        key: caption\n        prompt: Caption.\n      metric: FENSE\n"
        )
        result = CliRunner().invoke(
            eval_cli, ["tasks", "--track", "B-hidden", "--hidden-config", str(cfg), "--data-home", str(home)]
        )
        assert result.exit_code == 0, result.output
        assert "tacos" in result.output and "missing 3 of 3 shard files" in result.output
        assert "Track B decoder" in result.output

    def test_bad_hidden_config_is_one_line(self, tmp_path):
        cfg = tmp_path / "h.yaml"
        cfg.write_text("A-hidden: [oops")
        result = CliRunner().invoke(eval_cli, ["tasks", "--hidden-config", str(cfg)])
        assert result.exit_code == 2 and "not valid YAML" in result.output and "Traceback" not in result.output

    @pytest.mark.slow
    def test_demo_data_is_deterministic(self, tmp_path, home):
        """A second generation (through the CLI, elsewhere) gives the same bytes as the first."""
        result = CliRunner().invoke(eval_cli, ["demo-data", "--out", str(tmp_path), "--track", "demo-b"])
        assert result.exit_code == 0, result.output
        assert "demo-sentences (iWER)" in result.output
        assert (tmp_path / "demo-b" / "demo-b_eval.yaml").is_file()
        assert tree_digests(tmp_path / "demo-b") == tree_digests(home / "demo-b")
        task = get_track("demo-b", data_home=tmp_path).task("demo-captions")
        assert shard_digests(task, "train", data_home=tmp_path) == shard_digests(task, "train", data_home=home)
