"""Tracks and data: the task registry, XARES-LLM YAML, the shard cache, the shard reader, demo tracks.

Public surface (other stages import from here only)::

    track = get_track("A")                       # or load_xares_yaml(train_yaml, eval_yaml)
    report = SkipReport(task=task.id, split="test")
    for clip in iter_clips(task, "test", report=report):   # Clip(key, audio float32 16 kHz, targets)
        ...
    print(report.summary())
"""

from evaluator.data.audio import SAMPLE_RATE, load_audio
from evaluator.data.cache import (
    ShardStatus,
    data_home,
    file_sha256,
    resolve_shards,
    shard_digests,
    shard_files,
)
from evaluator.data.patterns import expand_braces
from evaluator.data.shards import (
    SKIP_REASONS,
    Clip,
    SkipReport,
    clips_by_key,
    extract_targets,
    is_corrupt_text,
    iter_clips,
    read_shard,
    shard_names,
    write_shard,
)
from evaluator.data.specs import Prompt, Split, TaskSpec, TrackSpec, choose_prompt, prompt_draw
from evaluator.data.tasks import (
    HIDDEN_CONFIG_ENV,
    PUBLIC_HIDDEN_TASKS,
    get_track,
    hidden_config_path,
    list_tracks,
)
from evaluator.data.xares_yaml import KNOWN_METRICS, label_keys, load_xares_yaml


def generate_demo(track, out_dir, seed=0, **kwargs):
    """Generate a demo track's shards and YAMLs (see `evaluator.data.demo.generate_demo`)."""
    from evaluator.data.demo import generate_demo as _generate

    return _generate(track, out_dir, seed, **kwargs)


__all__ = [
    "HIDDEN_CONFIG_ENV",
    "KNOWN_METRICS",
    "PUBLIC_HIDDEN_TASKS",
    "SAMPLE_RATE",
    "SKIP_REASONS",
    "Clip",
    "Prompt",
    "ShardStatus",
    "SkipReport",
    "Split",
    "TaskSpec",
    "TrackSpec",
    "choose_prompt",
    "clips_by_key",
    "data_home",
    "expand_braces",
    "extract_targets",
    "file_sha256",
    "generate_demo",
    "get_track",
    "hidden_config_path",
    "is_corrupt_text",
    "iter_clips",
    "label_keys",
    "list_tracks",
    "prompt_draw",
    "load_audio",
    "load_xares_yaml",
    "read_shard",
    "resolve_shards",
    "shard_digests",
    "shard_files",
    "shard_names",
    "write_shard",
]
