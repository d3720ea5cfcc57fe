"""Read XARES-LLM's task YAML files unchanged and turn them into a `TrackSpec`.

Train YAML: top-level training fields (``max_steps``, ``learning_rate``, ...) plus
``train_data: {Name: {prompt, data, key, prob, repo_id}}``. Eval YAML:
``{eval_name: {data: {data, key, prompt, repo_id}, metric, metric_args, batch_size, num_workers, weight}}``.
A train entry and an eval entry are one task when the train name, lower-cased, equals the eval name
without its ``eval_`` prefix (``ESC-50`` and ``eval_esc-50``).

Relative local shard paths (entries without ``repo_id``) are resolved against the YAML file's folder,
or, when nothing matches there, against the current directory (where XARES-LLM resolves them).

Example::

    track = load_xares_yaml(Path("train.yaml"), Path("eval.yaml"))
"""

from __future__ import annotations

import difflib
import logging
import os
import re
from dataclasses import fields
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

from evaluator.data.patterns import expand_braces, has_glob
from evaluator.data.specs import DEFAULT_DECODER, TaskSpec, TrackSpec
from evaluator.errors import ConfigError

log = logging.getLogger(__name__)

KNOWN_METRICS = ("Accuracy", "mAP", "iWER", "iCER", "FENSE", "DATE")
DEFAULT_LABEL_KEYS = ("captions", "caption", "text")  # tried after the configured keys (XARES-LLM)
TASK_ID = re.compile(r"^[a-z0-9][a-z0-9._-]*$")  # ids become folder names: nothing else allowed

TRAIN_ENTRY_FIELDS = {"prompt", "data", "key", "prob", "repo_id"}
EVAL_DATA_FIELDS = {"data", "key", "prompt", "repo_id", "prob"}
EVAL_ENTRY_FIELDS = {"data", "metric", "metric_args", "batch_size", "num_workers", "weight"}

# Train-YAML top-level fields that map onto TrackSpec fields, with their expected type.
_TRACK_FIELD_TYPES: dict[str, type] = {
    "max_steps": int,
    "learning_rate": float,
    "warmup_steps": int,
    "weight_decay": float,
    "max_grad_norm": float,
    "per_device_train_batch_size": int,
    "seed": int,
    "crop_audio_length": float,
    "decoder_model_name": str,
    "optimizer": str,
    "save_steps": int,
    "save_total_limit": int,
}


def read_yaml(path: Path) -> Any:
    """Parse one YAML file safely.

    Raises:
        ConfigError: the file is missing, unreadable or not valid YAML.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise ConfigError(f"{path}: no such file") from e
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read ({e})") from e
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from e


def label_keys(key: str | None) -> tuple[str, ...]:
    """The json keys tried in order: the configured ``a;b;c`` keys, then captions, caption, text."""
    configured = [k.strip() for k in (key or "").split(";") if k.strip()]
    out: list[str] = []
    for k in configured + list(DEFAULT_LABEL_KEYS):
        if k not in out:
            out.append(k)
    return tuple(out)


def load_xares_yaml(
    train_yaml: Path | None,
    eval_yaml: Path | None,
    *,
    track: str = "custom",
    hidden: bool = False,
    decoder_track: str | None = None,
) -> TrackSpec:
    """Load a track from XARES-LLM train and/or eval YAML files, unchanged.

    Args:
        train_yaml: XARES-LLM training config (``train_data`` + top-level fields), or None (eval only).
        eval_yaml: XARES-LLM evaluation config, or None (train only).
        track: the name the track gets ("custom" for user files).
        hidden: mark every task as hidden (organizer-only).
        decoder_track: the track whose decoder scores these tasks (default: ``track``).

    Returns:
        The track, tasks in eval-file order followed by train-only tasks.

    Raises:
        ConfigError: neither file given, a file is unreadable, or an entry breaks the format.
    """
    if train_yaml is None and eval_yaml is None:
        raise ConfigError("give a train YAML, an eval YAML or both")
    train_doc = read_yaml(train_yaml) if train_yaml is not None else None
    eval_doc = read_yaml(eval_yaml) if eval_yaml is not None else None
    return parse_xares_docs(
        train_doc,
        eval_doc,
        track=track,
        hidden=hidden,
        decoder_track=decoder_track,
        train_dir=Path(train_yaml).parent if train_yaml is not None else None,
        eval_dir=Path(eval_yaml).parent if eval_yaml is not None else None,
        sources=tuple(str(p) for p in (train_yaml, eval_yaml) if p is not None),
    )


def parse_xares_docs(
    train_doc: Any,
    eval_doc: Any,
    *,
    track: str,
    hidden: bool = False,
    decoder_track: str | None = None,
    train_dir: Path | None = None,
    eval_dir: Path | None = None,
    sources: tuple[str, ...] = (),
) -> TrackSpec:
    """Build a `TrackSpec` from already-parsed XARES-LLM documents (see `load_xares_yaml`).

    ``train_dir``/``eval_dir`` are where relative local shard paths are looked up first.

    Raises:
        ConfigError: a document breaks the format.
    """
    train_where = sources[0] if sources and train_doc is not None else "train config"
    eval_where = sources[-1] if sources and eval_doc is not None else "eval config"
    train_entries, track_fields, extra = ({}, {}, {})
    if train_doc is not None:
        train_entries, track_fields, extra = _parse_train_doc(train_doc, train_where, train_dir)
    eval_entries = _parse_eval_doc(eval_doc, eval_where, eval_dir) if eval_doc is not None else {}

    tasks: list[TaskSpec] = []
    for task_id, ev in eval_entries.items():
        tr = train_entries.get(task_id)
        prompt = ev["prompt"]
        train_prompt = None
        if tr is not None and tr["prompt"] != prompt:
            train_prompt = tr["prompt"]
            log.warning("task %s: the train prompt %r differs from the eval prompt %r", task_id, tr["prompt"], prompt)
        tasks.append(
            TaskSpec(
                id=task_id,
                name=tr["name"] if tr is not None else task_id,
                track=track,
                hidden=hidden,
                prompt=prompt,
                train_keys=tr["keys"] if tr is not None else (),
                eval_keys=ev["keys"],
                metric=ev["metric"],
                metric_args=ev["metric_args"],
                train_shards=tr["shards"] if tr is not None else (),
                test_shards=ev["shards"],
                repo_id=ev["repo_id"],
                prob=tr["prob"] if tr is not None else None,
                batch_size=ev["batch_size"],
                num_workers=ev["num_workers"],
                weight=ev["weight"],
                train_prompt=train_prompt,
                train_repo_id=tr["repo_id"] if tr is not None else None,
            )
        )
    for task_id, tr in train_entries.items():
        if task_id in eval_entries:
            continue
        tasks.append(
            TaskSpec(
                id=task_id,
                name=tr["name"],
                track=track,
                hidden=hidden,
                prompt=tr["prompt"],
                train_keys=tr["keys"],
                train_shards=tr["shards"],
                prob=tr["prob"],
                train_repo_id=tr["repo_id"],
            )
        )
    if not tasks:
        raise ConfigError(f"{' and '.join(sources) or 'config'}: no tasks (empty train_data and eval config)")
    return TrackSpec(
        name=track,
        tasks=tuple(tasks),
        decoder_track=decoder_track or track,
        extra=extra,
        sources=sources,
        **track_fields,
    )


# ---------------------------------------------------------------------------------------------- train


def _parse_train_doc(doc: Any, where: str, base_dir: Path | None):
    if not isinstance(doc, dict):
        raise ConfigError(f"{where}: expected a mapping with train_data, got {type(doc).__name__}")
    if "train_data" not in doc:
        raise ConfigError(
            f"{where}: no train_data (is this an eval config? pass it as the eval YAML)",
            reasons=[f"top-level keys: {', '.join(map(str, doc)) or '(none)'}"],
        )
    data = doc["train_data"]
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"{where}: train_data must be a non-empty mapping {{Name: {{prompt, data, key, prob, repo_id}}}}")
    entries: dict[str, dict[str, Any]] = {}
    for name, entry in data.items():
        at = f"{where}: train_data.{name}"
        task_id = str(name).lower()
        _check_id(task_id, at)
        if task_id in entries:
            raise ConfigError(f"{at}: two train entries map to task id {task_id!r}")
        if not isinstance(entry, dict):
            raise ConfigError(f"{at}: expected a mapping {{prompt, data, key, prob, repo_id}}")
        _check_fields(entry, TRAIN_ENTRY_FIELDS, at)
        repo_id = _repo_id(entry.get("repo_id"), at)
        entries[task_id] = {
            "name": str(name),
            "prompt": _prompt(entry.get("prompt", ""), at),
            "keys": label_keys(_key(entry.get("key"), at)),
            "prob": _number(entry.get("prob"), at + ".prob", allow_none=True, minimum=0.0),
            "repo_id": repo_id,
            "shards": _shards(entry.get("data"), repo_id, base_dir, at),
        }
    track_fields: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for k, v in doc.items():
        if k == "train_data":
            continue
        if k in _TRACK_FIELD_TYPES:
            track_fields[k] = _typed(v, _TRACK_FIELD_TYPES[k], f"{where}: {k}")
        else:
            extra[str(k)] = v
    assert set(track_fields) <= {f.name for f in fields(TrackSpec)}
    if track_fields.get("max_steps", 1) <= 0:
        raise ConfigError(f"{where}: max_steps must be positive, got {track_fields['max_steps']}")
    if track_fields.get("decoder_model_name", DEFAULT_DECODER) == "":
        raise ConfigError(f"{where}: decoder_model_name is empty")
    return entries, track_fields, extra


# ----------------------------------------------------------------------------------------------- eval


def _parse_eval_doc(doc: Any, where: str, base_dir: Path | None) -> dict[str, dict[str, Any]]:
    if not isinstance(doc, dict) or not doc:
        raise ConfigError(f"{where}: expected a non-empty mapping {{eval_name: {{data, metric, ...}}}}")
    if "train_data" in doc:
        raise ConfigError(f"{where}: has train_data (is this a train config? pass it as the train YAML)")
    entries: dict[str, dict[str, Any]] = {}
    for name, entry in doc.items():
        at = f"{where}: {name}"
        name = str(name)
        task_id = (name.removeprefix("eval_")).lower()
        _check_id(task_id, at)
        if task_id in entries:
            raise ConfigError(f"{at}: two eval entries map to task id {task_id!r}")
        if not isinstance(entry, dict):
            raise ConfigError(f"{at}: expected a mapping {{data, metric, metric_args, batch_size, ...}}")
        _check_fields(entry, EVAL_ENTRY_FIELDS, at)
        data = entry.get("data")
        if not isinstance(data, dict):
            raise ConfigError(f"{at}.data: expected a mapping {{data, key, prompt, repo_id}}")
        _check_fields(data, EVAL_DATA_FIELDS, at + ".data")
        metric = entry.get("metric")
        if metric not in KNOWN_METRICS:
            close = difflib.get_close_matches(str(metric), KNOWN_METRICS, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"{at}: unknown metric {metric!r}{hint}; known: {', '.join(KNOWN_METRICS)}")
        metric_args = entry.get("metric_args") or {}
        if not isinstance(metric_args, dict):
            raise ConfigError(f"{at}.metric_args: expected a mapping, got {metric_args!r}")
        if metric == "mAP":
            n = metric_args.get("num_classes")
            if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
                raise ConfigError(f"{at}: metric mAP needs metric_args.num_classes (a positive integer), got {n!r}")
        repo_id = _repo_id(data.get("repo_id"), at + ".data")
        entries[task_id] = {
            "prompt": _prompt(data.get("prompt", ""), at + ".data"),
            "keys": label_keys(_key(data.get("key"), at + ".data")),
            "repo_id": repo_id,
            "shards": _shards(data.get("data"), repo_id, base_dir, at + ".data"),
            "metric": metric,
            "metric_args": dict(metric_args),
            "batch_size": _typed(entry.get("batch_size", 32), int, at + ".batch_size", minimum=1),
            "num_workers": _typed(entry.get("num_workers", 0), int, at + ".num_workers", minimum=0),
            "weight": _typed(entry.get("weight", 1), float, at + ".weight", minimum=0.0),
        }
    return entries


# -------------------------------------------------------------------------------------------- helpers


def _check_id(task_id: str, at: str) -> None:
    if not TASK_ID.match(task_id):
        raise ConfigError(f"{at}: task id {task_id!r} must be lower-case letters, digits, '.', '_' or '-'")


def _check_fields(entry: dict, allowed: set[str], at: str) -> None:
    unknown = sorted(str(k) for k in entry if k not in allowed)
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, sorted(allowed), n=1)
            hints.append(f"{k} (did you mean {close[0]}?)" if close else k)
        raise ConfigError(f"{at}: unknown field(s) {', '.join(hints)}; allowed: {', '.join(sorted(allowed))}")


def _prompt(value: Any, at: str) -> str | tuple[str, ...]:
    """One prompt, or a non-empty list of prompts (XARES-LLM draws one per sample)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return value[0] if len(value) == 1 else tuple(value)
    raise ConfigError(f"{at}.prompt: expected a string or a non-empty list of strings, got {value!r:.80}")


def _key(value: Any, at: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise ConfigError(f"{at}.key: expected a string like 'label;labels', got {value!r}")


def _repo_id(value: Any, at: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not re.match(r"^[\w.-]+/[\w.-]+$", value):
        raise ConfigError(f"{at}.repo_id: expected a Hugging Face dataset id like 'owner/name', got {value!r}")
    return value


def _number(value: Any, at: str, *, allow_none: bool = False, minimum: float | None = None) -> float | None:
    if value is None and allow_none:
        return None
    return _typed(value, float, at, minimum=minimum)


def _typed(value: Any, kind: type, at: str, *, minimum: float | None = None) -> Any:
    """Coerce a YAML scalar to int/float/str; YAML 1.1 reads ``1e-4`` as a string, so numbers may arrive as text."""
    if value is None and kind is int and at.endswith("save_total_limit"):
        return None
    try:
        if kind is str:
            if not isinstance(value, str):
                raise TypeError
            out: Any = value
        elif isinstance(value, bool):
            raise TypeError
        elif kind is int:
            out = int(value) if isinstance(value, int) or (isinstance(value, float) and value.is_integer()) else int(str(value))
        else:
            out = float(value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{at}: expected {kind.__name__}, got {value!r}") from e
    if minimum is not None and out < minimum:
        raise ConfigError(f"{at}: must be >= {minimum}, got {out}")
    return out


def _shards(value: Any, repo_id: str | None, base_dir: Path | None, at: str) -> tuple[str, ...]:
    """Validate shard patterns; make local relative ones absolute (YAML folder first, then cwd)."""
    if isinstance(value, (str, Path)):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, (str, Path)) for v in value):
        raise ConfigError(f"{at}.data: expected a non-empty list of shard paths or patterns, got {value!r}")
    out: list[str] = []
    for raw in value:
        pattern = str(raw)
        if urlparse(pattern).scheme not in ("", "file") and not re.match(r"^[A-Za-z]:[\\/]", pattern):
            raise ConfigError(
                f"{at}.data: {pattern!r} is a URL; name a local path, or a repo-relative path plus repo_id"
            )
        pattern = pattern.removeprefix("file://")
        if repo_id is not None:
            for name in expand_braces(pattern):
                parts = Path(name).parts
                if Path(name).is_absolute() or ".." in parts or has_glob(name):
                    raise ConfigError(
                        f"{at}.data: {name!r} must be a plain path inside the repo {repo_id} (no '..', no globs)"
                    )
            out.append(pattern)
            continue
        out.append(_localize(os.path.expanduser(pattern), base_dir))
    return tuple(out)


def _localize(pattern: str, base_dir: Path | None) -> str:
    if os.path.isabs(pattern):
        return pattern
    candidates = [base_dir.resolve()] if base_dir is not None else []
    candidates.append(Path.cwd())
    for base in candidates:
        if any(_exists(str(base / p)) for p in expand_braces(pattern)):
            return str(base / pattern)
    return str(candidates[0] / pattern)  # nothing exists yet: report it relative to the YAML's folder


def _exists(path: str) -> bool:
    if has_glob(path):
        import glob

        return bool(glob.glob(path))
    return os.path.exists(path)
