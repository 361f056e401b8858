"""Shared pytest setup: tests marked `gpu` are skipped on machines without CUDA."""

import pytest


def pytest_collection_modifyitems(config, items):
    """Skip `gpu`-marked tests when torch sees no CUDA device."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
