"""Where each test sample lands in XARES-LLM's own predictions file, so the two can be diffed line by line.

The reference writes ``predictions_<eval name>.csv`` in the order its evaluation loader yields samples:
the split's shard files sorted (as names, or as download URLs for a repo), then shuffled with
``random.Random(42)`` (webdataset's ``SimpleShardList(urls, seed=42)``); members in tar order; one
sample per target text; then buffers of 256 samples sorted, longest first and stably, by
``prompt tokens + audio seconds``. We read clips in sorted shard order and keep one row per clip, so
this module maps each clip's texts to their rows in the reference's file.

Example::

    rows = reference_eval_order(task, [EvalSample("test_000.tar.gz", 2, 7, 5.0), ...])
    rows[0]  # -> (131, 132): the reference's rows of clip 0's two texts
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from evaluator.data.cache import shard_files
from evaluator.data.shards import shard_names
from evaluator.data.specs import TaskSpec

SHARD_SEED = 42  # SimpleShardList(urls, seed=42) in the reference's evaluation pipeline
SORT_BUFFER = 256  # sort_by_length=256 in the reference's evaluate_mlp
URL_SUFFIX = "?download=true"  # the reference sorts repo shards as download URLs that end with this


@dataclass(frozen=True)
class EvalSample:
    """One test clip as the reference's order needs it."""

    shard: str  # the shard name that prefixes the clip's key ("<shard name>/<member key>")
    texts: int  # target texts, one reference sample each
    prompt_tokens: int  # tokens of the clip's prompt
    seconds: float  # clip duration at 16 kHz


def reference_shard_order(names: Sequence[str], *, repo: bool) -> list[int]:
    """Indexes into ``names`` (one split's shard names) in the order the reference reads the shards."""
    keys = [n + URL_SUFFIX if repo else n for n in names]
    order = sorted(range(len(names)), key=lambda i: keys[i])
    random.Random(SHARD_SEED).shuffle(order)
    return order


def reference_eval_order(
    task: TaskSpec, samples: Sequence[EvalSample], *, data_home: Path | None = None
) -> list[tuple[int, ...]]:
    """The reference's predictions-file rows of every clip's texts.

    Args:
        task: the task (its test shards decide the shard order).
        samples: every test clip in our data order (shard by shard, tar order within one).
        data_home: the data cache (repo shards are named by their repo path, not their cache path).

    Returns:
        Per clip, one row index per target text (0-based, header excluded), in the clip's target order.
    """
    status = shard_files(task, "test", data_home=data_home)
    short = shard_names([f.path for f in status.files])
    rank = {short[i]: pos for pos, i in enumerate(
        reference_shard_order([f.name for f in status.files], repo=task.repo("test") is not None))}
    # the reference's stream: shard by shard in its order, clips in tar order, one sample per text
    clips = sorted(range(len(samples)), key=lambda c: (rank.get(samples[c].shard, len(rank)), c))
    stream = [(c, t) for c in clips for t in range(samples[c].texts)]
    rows: list[list[int]] = [[0] * s.texts for s in samples]
    out = 0
    for start in range(0, len(stream), SORT_BUFFER):
        buffer = stream[start : start + SORT_BUFFER]
        buffer.sort(key=lambda ct: samples[ct[0]].prompt_tokens + samples[ct[0]].seconds, reverse=True)
        for c, t in buffer:
            rows[c][t] = out
            out += 1
    return [tuple(r) for r in rows]
