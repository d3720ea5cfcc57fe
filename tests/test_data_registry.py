"""The task registry: Tracks A and B complete and equal to XARES-LLM's task1/task2, hidden tracks from config only."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from evaluator.data import PUBLIC_HIDDEN_TASKS, get_track, list_tracks
from evaluator.data.tasks import configured_hidden_tracks, tracks_dir
from evaluator.data.xares_yaml import parse_xares_docs
from evaluator.errors import ConfigError

TRACK_A = {
    "asvspoof2015": "Accuracy", "cremad": "Accuracy", "esc-50": "Accuracy", "fluentspeechcommands": "Accuracy",
    "freemusicarchive": "Accuracy", "fsd50k": "mAP", "fsdkaggle2018": "mAP", "gtzan": "Accuracy",
    "libricount": "Accuracy", "nsynth": "Accuracy", "speechcommandsv1": "Accuracy", "urbansound8k": "Accuracy",
    "vocalsound": "Accuracy", "voxceleb1": "Accuracy", "voxlingua33": "Accuracy",
}
TRACK_B = {"aishell-1": "iCER", "clotho": "FENSE", "librispeech": "iWER", "mecat": "DATE", "songdescriber": "FENSE"}
MIRROR = Path("/work/.mirror/xiaomi-research+xares-llm/repo")
REFERENCE = {
    "A": ("task1/train/train_task1_config.yaml", "task1/eval/eval_task1_config.yaml"),
    "B": ("task2/train/train_task2_config.yaml", "task2/eval/eval_task2_config.yaml"),
}


class TestPublicTracks:
    def test_track_a_is_complete(self):
        track = get_track("A")
        assert {t.id: t.metric for t in track.tasks} == TRACK_A
        assert all(t.trained and t.scored and not t.hidden for t in track.tasks)
        assert track.decoder_track == "A" and track.max_steps == 100000

    def test_track_b_is_complete(self):
        track = get_track("B")
        assert {t.id: t.metric for t in track.tasks} == TRACK_B
        assert track.task("mecat").repo_id == "mispeech/MECAT-Caption"
        assert {t.repo_id for t in track.tasks if t.id != "mecat"} == {"mispeech/xares_llm_data"}

    def test_protocol_facts(self):
        a = get_track("A")
        esc = a.task("esc-50")
        assert esc.name == "ESC-50" and esc.prompt == "Classify the environmental sound."
        assert esc.prob == 0.5 and esc.batch_size == 4
        assert esc.train_keys[:2] == ("label", "labels")
        assert esc.eval_keys == ("text", "caption", "captions", "label", "labels")  # defaults already in
        assert a.task("fsd50k").metric_args == {"num_classes": 200}
        assert a.task("fsdkaggle2018").metric_args == {"num_classes": 41}
        assert a.task("nsynth").train_keys == ("instrument_family_str", "captions", "caption", "text")
        assert a.task("nsynth").train_shards == ("NSynth/train/train_000{000..371}.tar.gz",)
        assert len(get_track("B").task("mecat").test_shards) == 10

    def test_mixture_follows_prob(self):
        mix = get_track("A").mixture()
        assert sum(mix.values()) == pytest.approx(1.0)
        assert mix["nsynth"] == pytest.approx(6 * mix["esc-50"])  # prob 3 vs 0.5

    def test_unknown_track_suggests(self):
        with pytest.raises(ConfigError, match="did you mean B-hidden"):
            get_track("B-hiden")

    def test_only_public_yaml_is_shipped(self):
        shipped = sorted(p.name for p in tracks_dir().iterdir())
        assert shipped == ["task1_eval.yaml", "task1_train.yaml", "task2_eval.yaml", "task2_train.yaml"]
        text = " ".join(p.read_text().lower() for p in tracks_dir().iterdir())
        for tasks in PUBLIC_HIDDEN_TASKS.values():
            for t in tasks:
                assert t.id not in text


@pytest.mark.skipif(not (MIRROR / "HEAD").exists() and not (MIRROR / ".git").exists(), reason="reference mirror absent")
@pytest.mark.parametrize("name", ["A", "B"])
def test_registry_equals_reference_yaml(name):
    docs = []
    for rel in REFERENCE[name]:
        out = subprocess.run(
            ["git", "-C", str(MIRROR), "show", f"HEAD:src/xares_llm/tasks/{rel}"], capture_output=True, text=True, check=False
        )
        if out.returncode != 0:
            pytest.skip(f"reference file {rel} not in the mirror")
        docs.append(yaml.safe_load(out.stdout))
    reference = parse_xares_docs(docs[0], docs[1], track=name)
    ours = get_track(name)
    assert ours.tasks == reference.tasks
    assert ours.training_fields() == reference.training_fields()


class TestHiddenTracks:
    def test_listed_names_are_public_only(self):
        assert set(list_tracks()) == {"A", "A-hidden", "B", "B-hidden", "demo-a", "demo-b"}
        assert len(PUBLIC_HIDDEN_TASKS["A-hidden"]) == 6 and len(PUBLIC_HIDDEN_TASKS["B-hidden"]) == 4

    def test_hidden_needs_config(self, monkeypatch):
        monkeypatch.delenv("XARES_HIDDEN_CONFIG", raising=False)
        with pytest.raises(ConfigError, match="--hidden-config"):
            get_track("A-hidden")
        assert configured_hidden_tracks(None) == ()

    def _config(self, tmp_path: Path) -> Path:
        (tmp_path / "a_train.yaml").write_text(
            "max_steps: 50\ntrain_data:\n  FingerSnap:\n    prompt: Classify the snap.\n"
            "    data:\n    - snap/train_{0..1}.tar.gz\n    key: label\n"
        )
        (tmp_path / "a_eval.yaml").write_text(
            "eval_fingersnap:\n  data:\n    data:\n    - snap/test_0.tar.gz\n    key: label\n"
            "    prompt: Classify the snap.\n  batch_size: 8\n  metric: Accuracy\n"
        )
        cfg = tmp_path / "hidden.yaml"
        cfg.write_text(
            "A-hidden:\n  train: a_train.yaml\n  eval: a_eval.yaml\n"
            "B-hidden:\n  eval:\n    eval_libriheavy:\n      data:\n        data: [lh/test.tar]\n"
            "        key: text\n        prompt: Transcribe.\n      metric: iWER\n"
        )
        return cfg

    def test_hidden_from_config(self, tmp_path):
        cfg = self._config(tmp_path)
        a = get_track("A-hidden", hidden_config=cfg)
        assert a.ids == ("fingersnap",) and a.task("fingersnap").hidden and a.decoder_track == "A-hidden"
        assert a.max_steps == 50
        assert a.task("fingersnap").train_shards == (str(tmp_path.resolve() / "snap/train_{0..1}.tar.gz"),)
        b = get_track("B-hidden", hidden_config=cfg)
        assert b.decoder_track == "B" and b.ids == ("libriheavy",)
        assert not b.task("libriheavy").trained and b.task("libriheavy").scored
        assert configured_hidden_tracks(cfg) == ("A-hidden", "B-hidden")

    def test_hidden_from_env(self, tmp_path, monkeypatch):
        monkeypatch.setenv("XARES_HIDDEN_CONFIG", str(self._config(tmp_path)))
        assert get_track("B-hidden").task("libriheavy").metric == "iWER"

    def test_b_hidden_takes_no_train(self, tmp_path):
        cfg = self._config(tmp_path)
        cfg.write_text("B-hidden:\n  train: a_train.yaml\n  eval: a_eval.yaml\n")
        with pytest.raises(ConfigError, match="Track B decoder"):
            get_track("B-hidden", hidden_config=cfg)

    def test_a_hidden_needs_train(self, tmp_path):
        cfg = self._config(tmp_path)
        cfg.write_text("A-hidden:\n  eval: a_eval.yaml\n")
        with pytest.raises(ConfigError, match="needs a 'train'"):
            get_track("A-hidden", hidden_config=cfg)

    def test_unknown_hidden_track(self, tmp_path):
        cfg = tmp_path / "h.yaml"
        cfg.write_text("C-hidden: {}\n")
        with pytest.raises(ConfigError, match="unknown hidden track"):
            get_track("A-hidden", hidden_config=cfg)
