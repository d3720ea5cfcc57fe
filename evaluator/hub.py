"""What the evaluator knows about the Hugging Face hub: where it is and whether it answers.

Shards (evaluator.data) and decoders (evaluator.model) both come from the hub; both ask here first, so a
machine without network fails in a second with a clear message instead of retrying for half a minute.
"""

from __future__ import annotations

import os
import socket

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
