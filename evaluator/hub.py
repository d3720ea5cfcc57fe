"""What the evaluator knows about the Hugging Face hub: where it is and whether it answers.

Shards (evaluator.data) and decoders (evaluator.model) both come from the hub; both ask here first, so a
machine without network fails in a second with a clear message instead of retrying for half a minute.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from evaluator.errors import ConfigError, ModelError, first_line

HF_TIMEOUT_S = 10.0  # per request; a host that drops packets must not hang the run


def hub_endpoint() -> str:
    """The Hugging Face endpoint: ``$HF_ENDPOINT`` read at call time, else huggingface_hub's default."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def hub_unreachable() -> str | None:
    """One quick TCP connect to the hub before any download: huggingface_hub retries a dead host for
    half a minute per file. Skipped behind a proxy, where a direct connect says nothing."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    from urllib.parse import urlparse

    endpoint = hub_endpoint()
    url = urlparse(endpoint)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    if not host:
        return None
    try:
        with socket.create_connection((host, port), timeout=HF_TIMEOUT_S):
            return None
    except OSError as e:
        return f"{endpoint} is unreachable ({e.strerror or type(e).__name__})"


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.txt")  # or vocab.json + merges.txt


def missing_decoder_files(folder: Path) -> list[str]:
    """What a local decoder folder lacks for transformers to load it as a causal LM (empty: nothing).

    Only names are checked here; whether the files parse is for `check_decoder` and the loader to say.
    """
    def has(*names: str) -> bool:
        return any((folder / name).is_file() for name in names)

    missing = []
    if not has("config.json"):
        missing.append("no config.json")
    if not has(*WEIGHT_FILES):
        missing.append("no weights (model.safetensors, pytorch_model.bin or a sharded *.index.json)")
    if not (has(*TOKENIZER_FILES) or (has("vocab.json") and has("merges.txt"))):
        missing.append("no tokenizer files (tokenizer.json, tokenizer.model, or vocab.json + merges.txt)")
    return missing


def decoder_source(name_or_path: str) -> tuple[str, bool, str]:
    """(what to pass to from_pretrained, local files only?, the hint a ModelError should give).

    Raises:
        ModelError: a hub name neither cached nor reachable.
        ConfigError: a path that is not a directory, or a directory that lacks a transformers model's files
            (config, weights, tokenizer): the option is wrong, exit code 2.
    """
    path = Path(name_or_path).expanduser()
    looks_like_path = name_or_path.startswith((".", "/", "~")) or path.exists()
    if looks_like_path and not path.is_dir():
        raise ConfigError(f"decoder directory {name_or_path} does not exist; pass a directory written by "
                         "save_pretrained or a hub name such as HuggingFaceTB/SmolLM2-135M")
    if looks_like_path:
        missing = missing_decoder_files(path)
        if missing:
            raise ConfigError(f"decoder directory {name_or_path} is not a transformers model: {'; '.join(missing)} "
                              "(save_pretrained writes the model and the tokenizer there; or pass a hub name such "
                              "as HuggingFaceTB/SmolLM2-135M)")
        return str(path), True, "check that it holds config.json, weights and tokenizer files"
    hint = (f"download it once on a connected machine (`hf download {name_or_path}`, the cache is "
            f"{os.environ.get('HF_HOME', '~/.cache/huggingface')}) or pass --decoder PATH to a local copy")
    if _offline() or _in_local_cache(name_or_path):
        return name_or_path, True, hint  # never touch the network for what is already here
    unreachable = hub_unreachable()
    if unreachable:
        raise ModelError(f"decoder {name_or_path!r} is not in the local Hugging Face cache and {unreachable}; "
                         f"{hint}")
    return name_or_path, False, hint


def _in_local_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # not a valid repo id
        return False


def check_decoder(name_or_path: str) -> None:
    """Fail fast, before hours of extraction, when the decoder cannot be found (reads its config only).

    Raises:
        ModelError: a hub name that is not cached (or not reachable).
        ConfigError: a missing directory, or one without a model's files or with an unreadable config.json.
    """
    from transformers import AutoConfig

    source, local_only, hint = decoder_source(name_or_path)
    try:
        AutoConfig.from_pretrained(source, local_files_only=local_only)
    except (OSError, ValueError) as e:
        reason = first_line(e).rstrip(". ")
        if Path(source).is_dir():  # a folder the user named: its files, not the hub, are wrong
            raise ConfigError(f"decoder directory {name_or_path}: cannot read its config.json ({reason}); "
                              f"{hint}") from e
        raise ModelError(f"cannot find decoder {name_or_path!r}: {reason}; {hint}") from e
