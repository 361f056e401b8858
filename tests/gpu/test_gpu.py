"""On a CUDA machine: generation and DPO on the GPU (skipped elsewhere; run in a session lent a GPU)."""

import pytest

from metareward.config.campaign import DPOConfig
from metareward.inference.base import GenerationRequest
from metareward.inference.transformers_backend import TransformersBackend
from metareward.training.trainer import train_dpo
from tests.integration.test_training import FAST, dataset

pytestmark = pytest.mark.gpu


def test_generation_runs_on_the_gpu(tiny_model):
    backend = TransformersBackend(tiny_model, dtype="bfloat16")
    try:
        assert backend.device == "cuda"
        result = backend.generate([GenerationRequest(({"role": "user", "content": "Hi"},), n=4, max_tokens=8, seed=1)])
        assert len(result[0].completions) == 4
    finally:
        backend.close()


def test_dpo_on_the_gpu_in_bf16(tmp_path, tiny_model):
    result = train_dpo(tiny_model, dataset(), DPOConfig(num_epochs=2, **FAST), tmp_path, dtype="bfloat16")
    losses = [entry["loss"] for entry in result.log_history if "loss" in entry]
    assert losses[-1] < losses[0]
