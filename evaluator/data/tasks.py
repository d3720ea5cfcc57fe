"""The track registry: public Tracks A and B (shipped YAML), hidden tracks (organizer YAML), demo tracks.

Tracks A and B are XARES-LLM's task1/task2 configs, kept verbatim in ``evaluator/data/tracks/``.
Hidden tracks are never shipped: they come from an organizer's hidden config (``--hidden-config`` or
``$XARES_HIDDEN_CONFIG``), a small YAML naming XARES-LLM train/eval YAMLs (paths relative to it)::

    A-hidden:                 # own decoder: needs train and eval
      train: hidden_a_train.yaml
      eval: hidden_a_eval.yaml
    B-hidden:                 # scored with the Track B decoder: eval only
      eval: hidden_b_eval.yaml

Each value may also be an inline XARES-LLM document instead of a path. Demo tracks are generated
offline (`evaluator.data.demo`) under the data home.

Example::

    track = get_track("A")
    hidden = get_track("B-hidden", hidden_config=Path("/secure/hidden.yaml"))
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from evaluator.data.cache import data_home as _data_home
from evaluator.data.specs import TrackSpec
from evaluator.data.xares_yaml import load_xares_yaml, parse_xares_docs, read_yaml
from evaluator.errors import ConfigError

HIDDEN_CONFIG_ENV = "XARES_HIDDEN_CONFIG"

PUBLIC_TRACKS = {  # name -> (train YAML, eval YAML) shipped in evaluator/data/tracks/
    "A": ("task1_train.yaml", "task1_eval.yaml"),
    "B": ("task2_train.yaml", "task2_eval.yaml"),
}
HIDDEN_TRACKS = {"A-hidden": "A-hidden", "B-hidden": "B"}  # name -> decoder track
DEMO_TRACKS = ("demo-a", "demo-b")
TRACKS = ("A", "A-hidden", "B", "B-hidden", "demo-a", "demo-b")


@dataclass(frozen=True)
class HiddenTaskName:
    """A hidden task as the challenge paper names it publicly (its data and config are not public)."""

    id: str
    name: str
    metric: str


# Public knowledge from the challenge paper; shown by `xares-eval tasks` until a hidden config is given.
PUBLIC_HIDDEN_TASKS: dict[str, tuple[HiddenTaskName, ...]] = {
    "A-hidden": (
        HiddenTaskName("fingersnap", "FingerSnap", "Accuracy"),
        HiddenTaskName("keyscratching", "KeyScratching", "Accuracy"),
        HiddenTaskName("king-asr-457", "King-ASR-457", "Accuracy"),
        HiddenTaskName("king-asr-719", "King-ASR-719", "Accuracy"),
        HiddenTaskName("king-asr-876", "King-ASR-876", "Accuracy"),
        HiddenTaskName("king-asr-955", "King-ASR-955", "Accuracy"),
    ),
    "B-hidden": (
        HiddenTaskName("aishell-6", "AISHELL-6", "iCER"),
        HiddenTaskName("libriheavy", "LibriHeavy", "iWER"),
        HiddenTaskName("musiccaps", "MusicCaps", "FENSE"),
        HiddenTaskName("tacos", "TACOS", "FENSE"),
    ),
}


def list_tracks() -> tuple[str, ...]:
    """Every track name `get_track` knows ("custom" tracks come from `load_xares_yaml`)."""
    return TRACKS


def tracks_dir() -> Path:
    """The folder holding the shipped public track YAMLs."""
    return Path(str(resources.files("evaluator.data") / "tracks"))


def hidden_config_path(hidden_config: Path | None = None) -> Path | None:
    """The hidden config to use: the argument, else ``$XARES_HIDDEN_CONFIG``, else None."""
    if hidden_config is not None and str(hidden_config) != "":
        return Path(hidden_config).expanduser()
    env = os.environ.get(HIDDEN_CONFIG_ENV, "")
    return Path(env).expanduser() if env else None


def get_track(name: str, *, hidden_config: Path | None = None, data_home: Path | None = None) -> TrackSpec:
    """Look up a track by name.

    Args:
        name: "A", "B", "A-hidden", "B-hidden", "demo-a" or "demo-b".
        hidden_config: the organizer's hidden config (default ``$XARES_HIDDEN_CONFIG``); hidden tracks only.
        data_home: the data cache (default ``$XARES_DATA_HOME`` or ``./xares_data``); demo tracks live in
            ``<data_home>/<name>/``.

    Returns:
        The track.

    Raises:
        ConfigError: unknown track name, or a hidden track without (or with a broken) hidden config.
    """
    if name in PUBLIC_TRACKS:
        train, evaluation = PUBLIC_TRACKS[name]
        base = tracks_dir()
        return load_xares_yaml(base / train, base / evaluation, track=name)
    if name in HIDDEN_TRACKS:
        return _hidden_track(name, hidden_config_path(hidden_config))
    if name in DEMO_TRACKS:
        from evaluator.data.demo import demo_documents

        folder = _data_home(data_home) / name
        train_doc, eval_doc = demo_documents(name)
        return parse_xares_docs(
            train_doc,
            eval_doc,
            track=name,
            train_dir=folder,
            eval_dir=folder,
            sources=(str(folder / f"{name}_train.yaml"), str(folder / f"{name}_eval.yaml")),
        )
    import difflib

    close = difflib.get_close_matches(name, TRACKS, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    raise ConfigError(f"unknown track {name!r}{hint}; known: {', '.join(TRACKS)}, or give XARES-LLM YAML files")


def configured_hidden_tracks(hidden_config: Path | None = None) -> tuple[str, ...]:
    """Hidden track names the hidden config defines (empty when no config is given).

    Raises:
        ConfigError: the config is unreadable or not a mapping.
    """
    config = hidden_config_path(hidden_config)
    if config is None:
        return ()
    index = read_yaml(config)
    if not isinstance(index, dict):
        raise ConfigError(f"{config}: expected a mapping of hidden track names (A-hidden, B-hidden) to YAMLs")
    return tuple(name for name in HIDDEN_TRACKS if name in index)


def _hidden_track(name: str, config: Path | None) -> TrackSpec:
    if config is None:
        raise ConfigError(
            f"track {name} is organizer-only: pass --hidden-config FILE or set {HIDDEN_CONFIG_ENV}",
            reasons=[f"FILE maps {name} to XARES-LLM YAMLs, e.g. '{name}: {{eval: hidden_eval.yaml}}'"],
        )
    index = read_yaml(config)
    if not isinstance(index, dict):
        raise ConfigError(f"{config}: expected a mapping of hidden track names (A-hidden, B-hidden) to YAMLs")
    unknown = sorted(str(k) for k in index if k not in HIDDEN_TRACKS)
    if unknown:
        raise ConfigError(f"{config}: unknown hidden track(s) {', '.join(unknown)}; known: {', '.join(HIDDEN_TRACKS)}")
    entry = index.get(name)
    if entry is None:
        raise ConfigError(f"{config}: has no {name} entry (it has: {', '.join(map(str, index)) or 'nothing'})")
    if not isinstance(entry, dict) or not set(entry) <= {"train", "eval"} or "eval" not in entry:
        raise ConfigError(f"{config}: {name} must be a mapping with 'eval' (and for A-hidden 'train')")
    decoder = HIDDEN_TRACKS[name]
    if name == "A-hidden" and "train" not in entry:
        raise ConfigError(f"{config}: A-hidden has its own decoder and needs a 'train' YAML too")
    if name == "B-hidden" and "train" in entry:
        raise ConfigError(
            f"{config}: B-hidden is scored with the Track B decoder; it takes no 'train' YAML (drop it)"
        )
    train_doc, train_dir, train_src = _doc(entry.get("train"), config, f"{name}.train")
    eval_doc, eval_dir, eval_src = _doc(entry["eval"], config, f"{name}.eval")
    return parse_xares_docs(
        train_doc,
        eval_doc,
        track=name,
        hidden=True,
        decoder_track=decoder,
        train_dir=train_dir,
        eval_dir=eval_dir,
        sources=tuple(s for s in (train_src, eval_src) if s),
    )


def _doc(value: Any, config: Path, where: str) -> tuple[Any, Path | None, str]:
    """A hidden-config value: a path (relative to the config) to a YAML file, or an inline document."""
    if value is None:
        return None, None, ""
    if isinstance(value, dict):
        return value, config.parent, f"{config}:{where}"
    if isinstance(value, str):
        path = Path(value).expanduser()
        if not path.is_absolute():
            path = config.parent / path
        return read_yaml(path), path.parent, str(path)
    raise ConfigError(f"{config}: {where} must be a path to a XARES-LLM YAML or an inline mapping")


def demo_folder(name: str, data_home: Path | None = None) -> Path:
    """Where a demo track's shards and YAMLs live.

    Raises:
        ConfigError: not a demo track name.
    """
    if name not in DEMO_TRACKS:
        raise ConfigError(f"{name!r} is not a demo track ({', '.join(DEMO_TRACKS)})")
    return _data_home(data_home) / name
