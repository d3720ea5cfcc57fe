"""The reference's predictions-file order, on hand-worked cases (webdataset's seeded shard shuffle, sort buffers)."""

from __future__ import annotations

from pathlib import Path

from evaluator.data.reference_order import EvalSample, reference_eval_order, reference_shard_order
from evaluator.data.specs import TaskSpec


def task(tmp_path: Path, names: list[str], repo: str | None = None) -> TaskSpec:
    shards = tuple(names) if repo else tuple(str(tmp_path / n) for n in names)
    return TaskSpec(id="t", name="t", track="custom", test_shards=shards, repo_id=repo, metric="Accuracy")


def test_shards_are_sorted_then_shuffled_with_seed_42():
    # random.Random(42).shuffle turns a list [x, y, z] into [y, x, z]; a list [x, y] into [y, x]
    assert reference_shard_order(["s_c", "s_a", "s_b"], repo=False) == [2, 1, 0]  # sorted a,b,c -> b,a,c
    # a repo's shards are sorted as download URLs ("...?download=true"): "x.tar" sorts after "x.tar.gz" then
    assert reference_shard_order(["x.tar", "x.tar.gz"], repo=False) == [1, 0]  # sorted x.tar, x.tar.gz -> swapped
    assert reference_shard_order(["x.tar", "x.tar.gz"], repo=True) == [0, 1]  # sorted x.tar.gz, x.tar -> swapped


def test_texts_are_samples_sorted_longest_first_and_stably(tmp_path):
    t = task(tmp_path, ["only.tar"])
    samples = [EvalSample("only.tar", 1, 5, 1.0), EvalSample("only.tar", 2, 5, 3.0), EvalSample("only.tar", 1, 5, 2.0)]
    # stream (clip, text): (0,0) 6 s+tok, (1,0) 8, (1,1) 8, (2,0) 7 -> sorted: (1,0) (1,1) (2,0) (0,0)
    assert reference_eval_order(t, samples) == [(3,), (0, 1), (2,)]
    # prompt tokens count as much as seconds: a longer prompt moves a clip up
    samples[0] = EvalSample("only.tar", 1, 9, 1.0)
    assert reference_eval_order(t, samples) == [(0,), (1, 2), (3,)]


def test_sorting_happens_within_buffers_of_256(tmp_path):
    t = task(tmp_path, ["only.tar"])
    samples = [EvalSample("only.tar", 1, 0, float(i)) for i in range(300)]  # longer and longer
    rows = [r[0] for r in reference_eval_order(t, samples)]
    assert rows[:256] == list(range(255, -1, -1))  # the first buffer, reversed
    assert rows[256:] == list(range(299, 255, -1))  # the last 44, reversed among themselves


def test_shard_order_comes_first(tmp_path):
    t = task(tmp_path, ["a.tar", "b.tar"])  # read as b, a
    samples = [EvalSample("a.tar", 1, 0, 9.0), EvalSample("b.tar", 1, 0, 1.0), EvalSample("b.tar", 1, 0, 1.0)]
    # stream: b's two clips, then a's; one buffer sorted by length: a (9 s) first, then b's in stream order
    assert reference_eval_order(t, samples) == [(0,), (1,), (2,)]
    samples = [EvalSample("a.tar", 1, 0, 1.0), EvalSample("b.tar", 1, 0, 1.0), EvalSample("b.tar", 1, 0, 1.0)]
    assert reference_eval_order(t, samples) == [(2,), (0,), (1,)]  # all tied: b's clips first
