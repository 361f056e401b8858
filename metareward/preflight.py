"""Everything that can fail before any model work, checked in seconds: the iterations asked for, the prompt file,
the artifact root, MLflow, the model a campaign starts from, the inference engine's interpreter or server, the
seed's SFT file and the evaluation's held-out prompts, reference outputs and evaluator."""

from __future__ import annotations

import os
from pathlib import Path

import httpx

from metareward.artifacts.store import open_store
from metareward.config.campaign import CampaignConfig, ConfigError, InferenceConfig
from metareward.host.devices import DeviceError, replica_devices, visible_gpus
from metareward.inference.base import InferenceError
from metareward.pipeline.context import ModelRef
from metareward.pipeline.input_files import held_out_prompts, load_prompts, load_reference_outputs, load_sft_examples
from metareward.pipeline.lease import check_campaign_free
from metareward.pipeline.model_roles import check_evaluator, evaluator_model, starting_model
from metareward.placement.gang import sharing_environment
from metareward.placement.replicas import PlacementError, check_ray_address, ray_address
from metareward.tracking.tracker import check_tracking
from metareward.training.models import check_model, model_id_of


def preflight(config: CampaignConfig, start_iteration: int = 1, start_model: str | None = None) -> str:
    """Check the start iteration, the prompt file, the artifact root (bucket exists, endpoint reachable,
    writable), that no other run holds the campaign (unless orchestration.lease_wait_s lets this one wait for it),
    MLflow when tracking is on, the model the campaign starts from (the base model when the seed's
    SFT runs first), on Ray the cluster and how its training gangs share the model (check_training_gangs), the
    engine (vLLM's interpreter, or an OpenAI-compatible server that answers), the SFT file
    and the evaluation's inputs (check_evaluation_inputs). Returns that model (see starting_model). Raises
    ConfigError, InputFileError, StoreError, CampaignHeldError, TrackingError, ModelNotFoundError or InferenceError
    naming what to fix."""
    check_start_iteration(config, start_iteration)
    load_prompts(config.prompts.path, config.prompts.column)
    store = open_store(config.artifact_root)
    store.check()
    if not config.orchestration.lease_wait_s:  # a run that may wait for the lease looks when its flow starts
        check_campaign_free(store, config.name)
    check_tracking(config)
    runs_sft = config.sft is not None and start_iteration == 1 and not start_model
    model = start_model or (config.model.path if runs_sft else starting_model(config, start_iteration, store))
    check_model(model, config.model.chat_template)
    address = ray_address(config.orchestration)
    if address:
        try:
            check_ray_address(address)
        except PlacementError as error:
            raise ConfigError(f"orchestration.ray_address / RAY_ADDRESS: {error}") from None
        check_training_gangs(config)
    check_engine(config.inference, on_ray=address is not None)
    if config.sft is not None:
        load_sft_examples(config.sft.path)
    check_evaluation_inputs(config, None if runs_sft else model)
    return model


def check_training_gangs(config: CampaignConfig) -> None:
    """Every training section's accelerate_config can say how a Ray Train gang shares the model (it exists, and
    is not DeepSpeed, which runs under `accelerate launch` only). Raises ConfigError naming the section."""
    sections = [("sft", config.sft)] if config.sft is not None else []
    sections += [(f"iterations[{index}].dpo", iteration.dpo) for index, iteration in enumerate(config.iterations)]
    for where, settings in sections:
        try:
            sharing_environment(settings.accelerate_config, settings.num_processes)
        except (PlacementError, FileNotFoundError, ValueError) as error:
            raise ConfigError(f"{where}.accelerate_config: {error}") from None


def check_evaluation_inputs(config: CampaignConfig, start_model: str | None = None) -> None:
    """With an evaluation section: the held-out prompts share none with the training prompts, the reference
    outputs file reads, the evaluator's weights (or endpoint) can serve, and the evaluator is not `start_model`
    (the model the campaign starts from) unless evaluator.allow_trained_model. Each iteration checks its own M_t
    and M_{t+1} again (check_evaluator), the SFT's M_1 among them."""
    evaluation = config.evaluation
    if evaluation is None:
        return
    held_out_prompts(evaluation.prompts.path, evaluation.prompts.column, config.prompts.path, config.prompts.column)
    if evaluation.reference_outputs:
        load_reference_outputs(evaluation.reference_outputs)
    evaluator = evaluation.evaluator
    if evaluator.model is not None:
        check_model(evaluator.model.path, evaluator.model.chat_template)
    check_engine(evaluator.inference, "evaluation.evaluator.inference",
                 on_ray=ray_address(config.orchestration) is not None)
    if start_model is not None:
        check_evaluator(config, evaluator_model(config), [ModelRef(start_model, model_id_of(start_model))])


def check_evaluation(config: CampaignConfig, model: str | None = None, output: str | None = None) -> None:
    """What evaluating a model needs, checked before it judges anything: a folder to write `output` into,
    MLflow (when tracking is on), the model (default model.path) and the engine."""
    if output and not Path(output).resolve().parent.is_dir():
        raise ConfigError(f"output {output}: the folder {Path(output).resolve().parent} does not exist")
    check_tracking(config)
    check_model(model or config.model.path, config.model.chat_template)
    check_engine(config.inference)


def check_start_iteration(config: CampaignConfig, start_iteration: int) -> None:
    """Raise ConfigError unless 1 <= start_iteration <= the config's number of iterations."""
    if not 1 <= start_iteration <= len(config.iterations):
        raise ConfigError(f"start iteration {start_iteration}: "
                          f"{config.name} has iterations 1..{len(config.iterations)}")


def check_engine(inference: InferenceConfig, field: str = "inference", on_ray: bool = False) -> None:
    """The vllm backend's interpreter exists and, unless its replicas run on a Ray cluster (on_ray), the GPUs visible
    here hold its replicas × tensor_parallel_size; an OpenAI-compatible server given by inference.base_url answers
    /v1/models within 10 s (and serves inference.api_model when one is named). Raises ConfigError or
    InferenceError naming the settings as `field` (the campaign's inference, or the evaluator's)."""
    if inference.backend == "vllm" and inference.base_url is None:
        from metareward.inference.vllm_backend import DEFAULT_VLLM_PYTHON

        python = Path(inference.vllm_python or os.environ.get("METAREWARD_VLLM_PYTHON", DEFAULT_VLLM_PYTHON))
        if not python.exists():
            raise ConfigError(f"{field}.backend vllm: vLLM's Python {python} does not exist "
                              f"(bash infra/setup.sh --vllm, or set {field}.vllm_python)")
        if not on_ray:
            try:
                replica_devices(inference.replicas, inference.tensor_parallel_size, visible_gpus())
            except DeviceError as error:
                raise ConfigError(str(error).replace("inference.", f"{field}.")) from None
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
        raise InferenceError(f"{field}.base_url {inference.base_url}: no OpenAI-compatible server answers {url} "
                             f"({type(error).__name__}: {error}); start it or fix the URL") from None
    if inference.api_model and served and inference.api_model not in served:
        raise InferenceError(f"{field}.api_model {inference.api_model!r} is not served at {inference.base_url} "
                             f"(it serves {served})")
