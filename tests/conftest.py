"""Shared pytest setup: the tiny model, vLLM's interpreter, and skipping `gpu` tests without CUDA."""

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROMPT_FILE = REPO / "deployments" / "prompts" / "assistant-100.jsonl"


def pytest_collection_modifyitems(config, items):
    """Skip `gpu`-marked tests when torch sees no CUDA device."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny random Llama + offline BPE tokenizer with a chat template, built once per session."""
    from metareward.training.models import build_tiny_model

    corpus = [json.loads(line)["prompt"] for line in PROMPT_FILE.read_text().splitlines()]
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", corpus=corpus)


@pytest.fixture(scope="session")
def vllm_python() -> Path:
    """vLLM's interpreter (its own venv). Missing: skipped locally, a failure where METAREWARD_REQUIRE_VLLM=1 (CI)."""
    python = Path(os.environ.get("METAREWARD_VLLM_PYTHON", REPO / ".venv-vllm" / "bin" / "python"))
    if not python.exists():
        message = f"vLLM's venv not found at {python} (bash .ci/run installs it)"
        if os.environ.get("METAREWARD_REQUIRE_VLLM") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return python
