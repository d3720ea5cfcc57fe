"""Shared test setup: offline Hugging Face, and markers for hardware needs."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def pytest_collection_modifyitems(config, items):
    import pytest

    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except Exception:  # torch missing or broken: no GPU tests either way
        has_gpu = False
    if not has_gpu:
        skip = pytest.mark.skip(reason="no usable CUDA device on this machine")
        for item in items:
            if "requires_gpu" in item.keywords:
                item.add_marker(skip)
