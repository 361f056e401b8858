"""The models a campaign's stages run, by role (stages.MODEL_ROLES): M_t to start an iteration from, M_1, the
reference M_{t+1} is compared with, the evaluator — the rule that keeps the evaluator off the model being
trained, and IterationModels, which answers for each stage of an iteration which model it runs."""

from __future__ import annotations

from metareward.artifacts.store import ArtifactStore, open_store
from metareward.artifacts.tables import content_id
from metareward.config.campaign import CampaignConfig, ConfigError
from metareward.pipeline.context import ModelRef
from metareward.pipeline.health_gate import recorded_decision
from metareward.pipeline.manifests import stage_manifests
from metareward.training.models import MODEL_DIGEST_FILE, model_id_of


def starting_model(config: CampaignConfig, start_iteration: int, store: ArtifactStore | None = None) -> str:
    """The model iteration `start_iteration` generates with when no start model is given: M_1 for iteration 1 —
    model.path, or with an sft section the seed SFT stage's model —; for a later one, M_t as the previous
    iteration of this campaign left it in the artifact store (its checkpoint stage's model, complete with
    model_id.txt; the model it generated with when its health decision was keep_model). Raises ConfigError
    saying how to get it when the store holds none."""
    if start_iteration == 1 and config.sft is None:
        return config.model.path
    store = store or open_store(config.artifact_root)
    previous = start_iteration - 1
    stage_name = "sft" if previous == 0 else "checkpoint"
    decision = recorded_decision(store, config.name, previous) if previous else None
    if decision is not None and decision.keeps_model:  # M_{t+1} = M_t: the model t generated with
        kept = generated_with(store, config.name, previous)
        if kept is not None:
            return kept.uri
    stats = stage_manifests(store, config.name).get(previous, {}).get(stage_name, {}).get("stats", {})
    model = stats.get("model_uri")
    trained = model and not stats.get("kept_previous_model")
    if not model or trained and not store.exists(f"{store.key_of(model)}/{MODEL_DIGEST_FILE}"):
        done = "the seed's SFT (metareward run from iteration 1)" if previous == 0 else f"iterations 1..{previous}"
        raise ConfigError(
            f"start iteration {start_iteration}: no finished {stage_name} of iteration {previous} of {config.name} "
            f"in {store.root}; run {done} first, or pass the model to start from "
            "(metareward run --start-model URI, or the flow's start_model)")
    return model


def reference_model(config: CampaignConfig, policy: ModelRef, iteration: int,
                    store: ArtifactStore | None = None) -> ModelRef:
    """What M_{t+1} is compared with when the reference is a model: M_t (`policy`, evaluation.reference
    previous) or M_1 (seed): in iteration 1 `policy` itself, later the model iteration 1 of this campaign
    generated with, as its responses' marker recorded it (so a --start-model of iteration 1 stays the
    reference); model.path or the seed SFT's model when the store has no iteration 1."""
    if config.evaluation.reference == "previous" or iteration == 1:
        return policy
    store = store or open_store(config.artifact_root)
    generated = generated_with(store, config.name, 1)
    if generated is not None:
        return generated
    seed = starting_model(config, 1, store)
    return ModelRef(seed, model_id_of(seed))


def generated_with(store: ArtifactStore, campaign: str, iteration: int) -> ModelRef | None:
    """The model iteration t of the campaign generated its responses with, as its first shard's marker recorded it;
    None when the store has no responses of iteration t."""
    shards = stage_manifests(store, campaign).get(iteration, {}).get("responses", {}).get("shards", {})
    if not shards:
        return None
    first = next(iter(shards.values()))["uri"]
    model = store.read_json(store.key_of(first).removesuffix(".parquet") + ".json")["job"]["model"]
    return ModelRef(model["uri"], model["model_id"])


def evaluator_model(config: CampaignConfig) -> ModelRef:
    """The evaluation's evaluator as the win-rate stage's model: its weights and their digest, or, for an endpoint
    without weights, its api_model with a digest of that name."""
    evaluator = config.evaluation.evaluator
    if evaluator.model is not None:
        return ModelRef(evaluator.model.path, model_id_of(evaluator.model.path))
    name = evaluator.inference.api_model
    return ModelRef(name, "endpoint-" + content_id(name))


def check_evaluator(config: CampaignConfig, evaluator: ModelRef, trained: list[ModelRef]) -> None:
    """Raise ConfigError when the evaluator is one of the `trained` models (M_t, M_{t+1}: it would judge its own
    answers) and evaluation.evaluator.allow_trained_model is off."""
    if config.evaluation.evaluator.allow_trained_model:
        return
    for model in trained:
        if model.model_id == evaluator.model_id:
            raise ConfigError(
                f"evaluation.evaluator {evaluator.uri} is the model being trained ({model.uri}, digest "
                f"{model.model_id}): it would judge its own answers. Use a fixed model, or set "
                "evaluation.evaluator.allow_trained_model: true")


class IterationModels:
    """The model each stage of one iteration runs, by the stage's role (stages.MODEL_ROLES): policy and base are the
    model the iteration starts from (M_t, or the base model of the seed's SFT), trained is the model its training
    stage wrote (M_{t+1}), reference and evaluator come from config.evaluation. The evaluator is checked against M_t
    when the iteration starts and against M_{t+1} before it compares (check_evaluator)."""

    def __init__(self, config: CampaignConfig, iteration: int, policy: ModelRef):
        self.config = config
        self.iteration = iteration
        self.policy = policy
        self.trained: ModelRef | None = None
        """M_{t+1}, once the iteration's training stage has finished (see trained_by)."""
        if config.evaluation and iteration > 0:
            check_evaluator(config, evaluator_model(config), [policy])

    def trained_by(self, stats: dict) -> ModelRef:
        """Record the model a training stage wrote (its statistics' model_uri and model_id) as M_{t+1}."""
        self.trained = ModelRef(stats["model_uri"], stats["model_id"])
        return self.trained

    def of(self, role: str | None) -> ModelRef | None:
        """The model of `role` (None: the stage runs no model). Raises ConfigError when the evaluator is a model
        being trained, RuntimeError when the trained model is asked for before the iteration trained one."""
        if role is None:
            return None
        if role in ("policy", "base"):
            return self.policy
        if role == "trained":
            if self.trained is None:
                raise RuntimeError(f"iteration {self.iteration}: no model trained yet; the training stage runs first")
            return self.trained
        if role == "reference":
            return reference_model(self.config, self.policy, self.iteration)
        if role == "evaluator":
            evaluator = evaluator_model(self.config)
            check_evaluator(self.config, evaluator, [model for model in (self.policy, self.trained) if model])
            return evaluator
        raise ValueError(f"unknown model role {role!r}")
