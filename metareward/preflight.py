"""Everything that can fail before any model work, checked in seconds: the iterations asked for, the prompt file,
the artifact root, MLflow, the model a campaign starts from, and the inference engine's interpreter or server."""

from __future__ import annotations

import os
from pathlib import Path

import httpx

from metareward.config import CampaignConfig, ConfigError
from metareward.inference.base import InferenceError
from metareward.manifests import stage_manifests
from metareward.models import MODEL_DIGEST_FILE, check_model
from metareward.store import ArtifactStore, open_store
from metareward.tables import load_prompts
from metareward.tracking import check_tracking


def preflight(config: CampaignConfig, start_iteration: int = 1, start_model: str | None = None) -> str:
    """Check the start iteration, the prompt file, the artifact root (bucket exists, endpoint reachable,
    writable), MLflow when tracking is on, the model the campaign starts from, and the engine (vLLM's
    interpreter, or an OpenAI-compatible server that answers). Returns that model (see starting_model).
    Raises ConfigError, PromptFileError, StoreError, TrackingError, ModelNotFoundError or InferenceError naming
    what to fix."""
    check_start_iteration(config, start_iteration)
    load_prompts(config.prompts.path, config.prompts.column)
    store = open_store(config.artifact_root)
    store.check()
    check_tracking(config)
    model = start_model or starting_model(config, start_iteration, store)
    check_model(model, config.model.chat_template)
    check_engine(config)
    return model


def check_evaluation(config: CampaignConfig, model: str | None = None, output: str | None = None) -> None:
    """What evaluating a model needs, checked before it judges anything: a folder to write `output` into,
    MLflow (when tracking is on), the model (default model.path) and the engine."""
    if output and not Path(output).resolve().parent.is_dir():
        raise ConfigError(f"output {output}: the folder {Path(output).resolve().parent} does not exist")
    check_tracking(config)
    check_model(model or config.model.path, config.model.chat_template)
    check_engine(config)


def check_start_iteration(config: CampaignConfig, start_iteration: int) -> None:
    """Raise ConfigError unless 1 <= start_iteration <= the config's number of iterations."""
    if not 1 <= start_iteration <= len(config.iterations):
        raise ConfigError(f"start iteration {start_iteration}: {config.name} has iterations 1..{len(config.iterations)}")


def starting_model(config: CampaignConfig, start_iteration: int, store: ArtifactStore | None = None) -> str:
    """The model iteration `start_iteration` generates with when no start model is given: model.path for
    iteration 1; for a later one, M_t as the previous iteration of this campaign left it in the artifact store
    (its checkpoint stage's model, complete with model_id.txt). Raises ConfigError saying how to pass it when
    the store holds none."""
    if start_iteration == 1:
        return config.model.path
    store = store or open_store(config.artifact_root)
    previous = start_iteration - 1
    stats = stage_manifests(store, config.name).get(previous, {}).get("checkpoint", {}).get("stats", {})
    model = stats.get("model_uri")
    trained = model and not stats.get("kept_previous_model")
    if not model or trained and not store.exists(f"{store.key_of(model)}/{MODEL_DIGEST_FILE}"):
        raise ConfigError(
            f"start iteration {start_iteration}: no finished checkpoint of iteration {previous} of {config.name} in "
            f"{store.root}; run iterations 1..{previous} first, or pass the model to start from "
            "(metareward run --start-model URI, or the flow's start_model)")
    return model


def check_engine(config: CampaignConfig) -> None:
    """The vllm backend's interpreter exists; an OpenAI-compatible server given by inference.base_url answers
    /v1/models within 10 s (and serves inference.api_model when one is named). Raises ConfigError or
    InferenceError."""
    inference = config.inference
    if inference.backend == "vllm" and inference.base_url is None:
        from metareward.inference.vllm_backend import DEFAULT_VLLM_PYTHON

        python = Path(inference.vllm_python or os.environ.get("METAREWARD_VLLM_PYTHON", DEFAULT_VLLM_PYTHON))
        if not python.exists():
            raise ConfigError(f"inference.backend vllm: vLLM's Python {python} does not exist "
                              "(bash infra/setup.sh --vllm, or set inference.vllm_python)")
        return
    if inference.backend == "transformers" or inference.base_url is None:
        return
    key = os.environ.get(inference.api_key_env)
    url = f"{inference.base_url}/v1/models"
    try:
        response = httpx.get(url, timeout=10, headers={"Authorization": f"Bearer {key}"} if key else {})
        response.raise_for_status()
        served = [model["id"] for model in response.json().get("data", [])]
    except (httpx.HTTPError, ValueError) as error:
        raise InferenceError(f"inference.base_url {inference.base_url}: no OpenAI-compatible server answers {url} "
                             f"({type(error).__name__}: {error}); start it or fix the URL") from None
    if inference.api_model and served and inference.api_model not in served:
        raise InferenceError(f"inference.api_model {inference.api_model!r} is not served at {inference.base_url} "
                             f"(it serves {served})")
