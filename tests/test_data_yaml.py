"""XARES-LLM YAML, read unchanged: train/eval pairing, local shards via braces and globs, clear config errors."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from evaluator.data import SkipReport, expand_braces, iter_clips, load_xares_yaml, write_shard
from evaluator.errors import ConfigError

TRAIN = """\
max_steps: 300
learning_rate: 1e-4
num_training_workers: 4
train_data:
    Toy-Words:
        prompt: Classify the keyword.
        data:
            - words/train/train_0000{00..02}.tar.gz
        key: text;caption;captions;label;labels
        prob: 2
    Toy-Count:
        prompt: Count the amount of speakers.
        data:
            - count/count_fold*.tar
        key: num_speakers
    TrainOnly:
        prompt: Just train.
        data: words/train/train_000000.tar.gz
"""

EVAL = """\
eval_toy-words:
  data:
    data:
    - words/test/test_0000{00..01}.tar.gz
    key: label;labels
    prompt: Classify the keyword.
  batch_size: 16
  num_workers: 2
  metric: Accuracy
eval_toy-count:
  data:
    data:
    - count/count_fold*.tar
    key: num_speakers
    prompt: Count the amount of speakers.
  batch_size: 4
  num_workers: 0
  metric: mAP
  metric_args:
    num_classes: 3
eval_evalonly:
  data:
    data:
    - words/test/test_000000.tar.gz
    key: text
    prompt: Only scored.
  metric: iWER
"""


def wav(seconds=0.4) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, (0.2 * np.sin(np.arange(int(16000 * seconds)) / 5)).astype(np.float32), 16000, format="WAV")
    return buf.getvalue()


def make_shards(root: Path) -> None:
    for split, n in (("train", 3), ("test", 2)):
        for s in range(n):
            members = []
            for i in range(4):
                members += [(f"{split}{s}_{i}.wav", wav()), (f"{split}{s}_{i}.json", json.dumps({"label": f"w{i}", "text": f"w{i}"}).encode())]
            write_shard(root / "words" / split / f"{split}_{s:06d}.tar.gz", members)
    for fold in range(2):
        write_shard(root / "count" / f"count_fold{fold}.tar",
                    [(f"c{fold}.flac", wav()), (f"c{fold}.json", json.dumps({"num_speakers": fold + 1}).encode())])


@pytest.fixture
def configs(tmp_path):
    make_shards(tmp_path)
    (tmp_path / "train.yaml").write_text(TRAIN)
    (tmp_path / "eval.yaml").write_text(EVAL)
    return tmp_path / "train.yaml", tmp_path / "eval.yaml"


class TestLoading:
    def test_reference_format_loads_unchanged(self, configs, tmp_path):
        track = load_xares_yaml(*configs)
        assert track.name == "custom" and track.decoder_track == "custom"
        assert track.ids == ("toy-words", "toy-count", "evalonly", "trainonly")
        assert track.max_steps == 300 and track.learning_rate == pytest.approx(1e-4)  # YAML 1.1 reads "1e-4" as text
        assert track.extra == {"num_training_workers": 4}
        words = track.task("toy-words")
        assert words.name == "Toy-Words" and words.prob == 2 and words.batch_size == 16
        assert words.train_keys[0] == "text" and words.eval_keys[:2] == ("label", "labels")
        assert words.train_shards == (str(tmp_path.resolve() / "words/train/train_0000{00..02}.tar.gz"),)
        count = track.task("toy-count")
        assert count.prob is None and count.metric == "mAP" and count.metric_args == {"num_classes": 3}
        assert not track.task("evalonly").trained and track.task("evalonly").scored
        assert track.task("trainonly").trained and not track.task("trainonly").scored
        mix = track.mixture()
        assert sum(mix.values()) == pytest.approx(1.0) and set(mix) == {"toy-words", "toy-count", "trainonly"}

    def test_clips_from_braces_and_globs(self, configs):
        track = load_xares_yaml(*configs)
        report = SkipReport()
        train = list(iter_clips(track.task("toy-words"), "train", report=report))
        assert len(train) == 12 and report.shards == 3 and report.skipped == 0
        assert train[0].key == "train_000000.tar.gz/train0_0" and train[0].targets == ("w0",)
        assert len({c.key for c in train}) == 12
        counts = list(iter_clips(track.task("toy-count"), "test"))
        assert [c.targets for c in counts] == [("1",), ("2",)]  # numbers become strings

    def test_relative_paths_fall_back_to_cwd(self, configs, tmp_path, monkeypatch):
        elsewhere = tmp_path / "configs"
        elsewhere.mkdir()
        (elsewhere / "eval.yaml").write_text(EVAL)
        monkeypatch.chdir(tmp_path)  # XARES-LLM resolves relative paths against the working directory
        track = load_xares_yaml(None, elsewhere / "eval.yaml")
        assert len(list(iter_clips(track.task("toy-words"), "test"))) == 8


class TestBraces:
    def test_expansion(self):
        assert expand_braces("a_{00..02}.tar") == ["a_00.tar", "a_01.tar", "a_02.tar"]
        assert expand_braces("fold_{1..3}_0") == ["fold_1_0", "fold_2_0", "fold_3_0"]
        assert len(expand_braces("train_000{000..371}.tar.gz")) == 372
        assert expand_braces("train_000{000..371}.tar.gz")[-1] == "train_000371.tar.gz"
        assert expand_braces("{a,b}/{0..1}") == ["a/0", "a/1", "b/0", "b/1"]
        assert expand_braces("x{}y{z}") == ["x{}y{z}"]


class TestErrors:
    def write(self, tmp_path, text, name="eval.yaml"):
        p = tmp_path / name
        p.write_text(text)
        return p

    def test_unknown_metric_suggests(self, tmp_path):
        p = self.write(tmp_path, EVAL.replace("metric: Accuracy", "metric: accuracy"))
        with pytest.raises(ConfigError, match="did you mean Accuracy"):
            load_xares_yaml(None, p)

    def test_map_needs_num_classes(self, tmp_path):
        p = self.write(tmp_path, EVAL.replace("num_classes: 3", "num_class: 3"))
        with pytest.raises(ConfigError, match="num_classes"):
            load_xares_yaml(None, p)

    def test_unknown_field(self, tmp_path):
        p = self.write(tmp_path, TRAIN.replace("prob: 2", "probability: 2"), "train.yaml")
        with pytest.raises(ConfigError, match="probability"):
            load_xares_yaml(p, None)

    def test_swapped_files(self, configs):
        with pytest.raises(ConfigError, match="pass it as the eval YAML"):
            load_xares_yaml(configs[1], None)
        with pytest.raises(ConfigError, match="pass it as the train YAML"):
            load_xares_yaml(None, configs[0])

    def test_bad_yaml_and_missing_file(self, tmp_path):
        with pytest.raises(ConfigError, match="not valid YAML"):
            load_xares_yaml(None, self.write(tmp_path, "a: [unclosed"))
        with pytest.raises(ConfigError, match="no such file"):
            load_xares_yaml(tmp_path / "nope.yaml", None)

    def test_repo_paths_stay_inside_repo(self, tmp_path):
        text = TRAIN.replace("key: num_speakers", "key: num_speakers\n        repo_id: mispeech/xares_llm_data").replace(
            "count/count_fold*.tar", "../../etc/passwd"
        )
        with pytest.raises(ConfigError, match="inside the repo"):
            load_xares_yaml(self.write(tmp_path, text, "train.yaml"), None)

    def test_urls_are_refused(self, tmp_path):
        text = TRAIN.replace("count/count_fold*.tar", "https://example.com/a.tar")
        with pytest.raises(ConfigError, match="is a URL"):
            load_xares_yaml(self.write(tmp_path, text, "train.yaml"), None)

    def test_bad_numbers(self, tmp_path):
        with pytest.raises(ConfigError, match="max_steps"):
            load_xares_yaml(self.write(tmp_path, TRAIN.replace("max_steps: 300", "max_steps: lots"), "t.yaml"), None)
        with pytest.raises(ConfigError, match="batch_size"):
            load_xares_yaml(None, self.write(tmp_path, EVAL.replace("batch_size: 16", "batch_size: 0")))

    def test_prompt_lists(self, tmp_path):
        # XARES-LLM draws one prompt of a list per sample; a list of one is that prompt; anything else is refused
        text = EVAL.replace("prompt: Classify the keyword.", "prompt: ['Classify the keyword.', 'Which word is it?']")
        track = load_xares_yaml(None, self.write(tmp_path, text))
        assert track.task("toy-words").prompt == ("Classify the keyword.", "Which word is it?")
        text = EVAL.replace("prompt: Classify the keyword.", "prompt: ['Classify the keyword.']")
        assert load_xares_yaml(None, self.write(tmp_path, text)).task("toy-words").prompt == "Classify the keyword."
        for bad in ("[]", "[{role: user}]", "[1, 2]", "{a: b}"):
            text = EVAL.replace("prompt: Classify the keyword.", f"prompt: {bad}")
            with pytest.raises(ConfigError, match="prompt: expected a string or a non-empty list of strings"):
                load_xares_yaml(None, self.write(tmp_path, text))

    def test_unsafe_task_id(self, tmp_path):
        with pytest.raises(ConfigError, match="task id"):
            load_xares_yaml(None, self.write(tmp_path, EVAL.replace("eval_toy-words", "eval_../x")))
