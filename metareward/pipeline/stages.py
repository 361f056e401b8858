"""The stage registry: every stage of an iteration defined once, in the order of the paper's Figure 1.

A stage's entry says what it reads (input stages), what it depends on (`settings`: one function of the config
and the iteration whose result is both hashed into the stage's cache key and passed to its runner as keyword
arguments, so the key cannot forget what the runner uses), what it writes (schema), how it runs (sharded by
prompts or not, which model it runs — see MODEL_ROLES), how MLflow shows it (dataset context, report columns)
and who computes it (runner). Tasks, cache keys, manifests, tracking and the summary table are all derived from
here.

Three phases: SEED_STAGES run once before iteration 1 (as iteration 0: the seed's SFT, when the config has an
`sft` section), ITERATION_STAGES are Figure 1, EVALUATION_STAGES follow an iteration's training (when the config
has an `evaluation` section).

Adding a stage: one `Stage` entry below, its runner in `metareward/pipeline/runners.py`, and one line in
`flows/iteration.py`; a config field that no stage reads goes into NOT_IN_ANY_TABLE with the reason.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import polars as pl

from metareward.artifacts.tables import (
    ACTOR_PAIRS,
    DPO_DATASET,
    EVAL_COMPARISONS,
    JUDGE_PAIRS,
    JUDGMENT_ELO,
    JUDGMENTS,
    META_JUDGMENTS,
    PROMPTS,
    RESPONSES,
    SFT_EXAMPLES,
    ContentFile,
)
from metareward.config.campaign import CampaignConfig, ConfigError, EvaluationConfig, InferenceConfig, SFTConfig
from metareward.pipeline import runners
from metareward.training.logs import SFT_LOG, TRAINING_LOG

Settings = Callable[[CampaignConfig, int], dict[str, Any]]


MODEL_ROLES = {"policy": "M_t", "base": "the base model", "trained": "M_t+1", "reference": "the reference",
               "evaluator": "the evaluator"}
"""Which model a stage runs (its content digest is in the stage's key), and how it is named: policy, M_t, the model
the iteration starts from (actor, judge, meta-judge; trained by DPO); base, model.path, which the seed's SFT trains
into M_1; trained, M_{t+1}, the model the iteration trained; reference, what M_{t+1} is compared with, M_t or M_1
(evaluation.reference); evaluator, the fixed model that compares two answers (evaluation.evaluator)."""


@dataclass(frozen=True)
class Stage:
    """One stage. `runner(context, **settings(config, t))` returns (table, StageStats).

    inputs: the stages whose tables it reads (optional_inputs may be absent); sharded: one job per shard of
    prompts, reading the same shard of sharded inputs; model: the MODEL_ROLES model it runs (its digest is in
    the key), None for arithmetic on tables; writes_model: leaves a model folder beside its table (model_id.txt
    last); dataset_context: MLflow's
    context of its table as an iteration run's dataset input (None: not logged as one); report_columns: the
    columns the per-iteration report reads; parses_verdicts: its rows carry a parsed verdict (the summary
    shows its parse-failure rate); version: bumped by hand when its rows change for a reason its code
    fingerprint cannot see (a library's behaviour).
    """

    name: str
    summary: str
    inputs: tuple[str, ...]
    settings: Settings
    schema: pl.Schema
    runner: Callable[..., Any]
    sharded: bool = False
    model: str | None = None
    optional_inputs: tuple[str, ...] = ()
    dataset_context: str | None = None
    report_columns: tuple[str, ...] = ()
    parses_verdicts: bool = False
    writes_model: bool = False
    version: int = 1

    @property
    def uses_model(self) -> bool:
        """Whether the stage runs a model (whose digest is then in its key)."""
        return self.model is not None

    @property
    def required_inputs(self) -> tuple[str, ...]:
        """The input stages every job of this stage needs (the others are optional)."""
        return tuple(name for name in self.inputs if name not in self.optional_inputs)


def engine_settings(inference: InferenceConfig, dtype: str, chat_template: str | None) -> dict[str, Any]:
    """What of an engine changes a model's outputs: backend, weights dtype, chat template, context length,
    and per backend its batch composition (transformers pads batches), server arguments (vllm) or served
    model name and tokenizer (openai). Where and how fast the engine runs is in NOT_IN_ANY_TABLE."""
    engine: dict[str, Any] = {"backend": inference.backend, "dtype": dtype, "chat_template": chat_template,
                              "max_model_len": inference.max_model_len}
    if inference.backend == "transformers":
        engine["batch_size"] = inference.batch_size
    elif inference.backend == "vllm":
        # Sharding a model's layers over GPUs changes its numerics; how many replicas serve it does not.
        engine.update(vllm_args=list(inference.vllm_args), tensor_parallel_size=inference.tensor_parallel_size)
    else:
        engine.update(api_model=inference.api_model, tokenizer=inference.tokenizer)
    return engine


def _engine(config: CampaignConfig) -> dict[str, Any]:
    return engine_settings(config.inference, config.model.dtype, config.model.chat_template)


def _settings(config: CampaignConfig, iteration: int):
    return config.iterations[iteration - 1]


def _sft(config: CampaignConfig) -> SFTConfig:
    if config.sft is None:
        raise ConfigError(why_not_run(config, "sft", 0))
    return config.sft


def _evaluation(config: CampaignConfig) -> EvaluationConfig:
    if config.evaluation is None:
        raise ConfigError(why_not_run(config, "win_rate", 1))
    return config.evaluation


def _trained_model(config: CampaignConfig) -> dict[str, Any]:
    # What a training stage reads besides its section: how the model is loaded and rendered, and the seed.
    return {"dtype": config.model.dtype, "chat_template": config.model.chat_template, "seed": config.seed}


def _answer_settings(config: CampaignConfig) -> dict[str, Any]:
    # The trained model and the reference answer alike, so that only the model differs between them.
    return {"sampling": _evaluation(config).sampling, "seed": config.seed, "engine": _engine(config)}


def evaluator_settings(config: CampaignConfig) -> dict[str, Any]:
    """What of the evaluator changes its verdicts: its engine (as engine_settings), whether it runs local weights
    (their digest is the win-rate job's model) or an endpoint's api_model, its verdict mode, and for free
    verdicts how many tokens it may write."""
    evaluator = _evaluation(config).evaluator
    weights = evaluator.model
    mode = evaluator.inference.verdict_mode
    return {"engine": engine_settings(evaluator.inference, weights.dtype if weights else "auto",
                                      weights.chat_template if weights else None),
            "weights": weights is not None, "verdict_mode": mode,
            "max_tokens": evaluator.max_tokens if mode == "free" else None}


SEED_STAGES: tuple[Stage, ...] = (
    Stage(
        name="sft_data",
        summary="the seed's judge examples: A.1 judge prompt of (instruction, response) → judgment (sec. 3.1)",
        inputs=(),
        settings=lambda config, t: {"sft_file": ContentFile.of(_sft(config).path)},
        schema=SFT_EXAMPLES, runner=runners.sft_data, dataset_context="training",
        report_columns=("score", "completion_chars"),
    ),
    Stage(
        name="sft",
        summary="SFT of the base model on the judge examples into M_1 with TRL, stopped at the kept epoch "
                "(A.3: 5 of 10)",
        inputs=("sft_data",),
        settings=lambda config, t: {"training": _sft(config).training(), **_trained_model(config)},
        schema=SFT_LOG, runner=runners.sft, model="base", writes_model=True,
    ),
)
"""Stage 0, run once before iteration 1 when the config has an sft section (iteration number 0)."""

ITERATION_STAGES: tuple[Stage, ...] = (
    Stage(
        name="prompts",
        summary="the iteration's block of prompts from the prompt file (seeded order, disjoint across iterations)",
        inputs=(),
        settings=lambda config, t: {
            "prompt_file": ContentFile.of(config.prompts.path), "column": config.prompts.column, "seed": config.seed,
            "block_sizes": [iteration.num_prompts for iteration in config.iterations[:t]]},
        schema=PROMPTS, runner=runners.prompts, dataset_context="generation",
    ),
    Stage(
        name="responses",
        summary="actor: K responses per prompt, identical ones dropped (sec. 2.1)",
        inputs=("prompts",),
        settings=lambda config, t: {
            "num_responses": _settings(config, t).num_responses, "sampling": _settings(config, t).actor_sampling,
            "seed": config.seed, "shard_size": config.shard_size, "engine": _engine(config)},
        schema=RESPONSES, runner=runners.responses, sharded=True, model="policy", dataset_context="generation",
        report_columns=("response_id", "n_chars", "n_tokens"),
    ),
    Stage(
        name="judgments",
        summary="judge: N judgments per response with the A.1 prompt, `Score: X` parsed (sec. 2.1)",
        inputs=("prompts", "responses"),
        settings=lambda config, t: {
            "num_judgments": _settings(config, t).num_judgments, "sampling": _settings(config, t).judge_sampling,
            "seed": config.seed, "verdict_mode": config.inference.verdict_mode, "engine": _engine(config)},
        schema=JUDGMENTS, runner=runners.judgments, sharded=True, model="policy", dataset_context="evaluation",
        report_columns=("judgment_id", "response_id", "score", "n_chars"), parses_verdicts=True,
    ),
    Stage(
        name="actor_pairs",
        summary="length-controlled actor pairs: top tier's shortest vs bottom tier's longest (ρ, sec. 2.1)",
        inputs=("prompts", "responses", "judgments"),
        settings=lambda config, t: {
            "rho": _settings(config, t).rho, "max_chosen_chars": _settings(config, t).max_chosen_response_chars},
        schema=ACTOR_PAIRS, runner=runners.actor_pairs, dataset_context="training", report_columns=("prompt_id",),
    ),
    Stage(
        name="meta_judgments",
        summary="meta-judge: every pair of the highest-variance response's judgments, both orders (sec. 2.2)",
        inputs=("prompts", "responses", "judgments"),
        settings=lambda config, t: {
            "sampling": _settings(config, t).meta_judge_sampling, "seed": config.seed,
            "verdict_mode": config.inference.verdict_mode, "engine": _engine(config),
            "sees_scores": _settings(config, t).meta_judge_sees_scores,
            "judged_responses": _settings(config, t).meta_judged_responses},
        schema=META_JUDGMENTS, runner=runners.meta_judgments, sharded=True, model="policy",
        dataset_context="evaluation", report_columns=("first_id", "second_id", "winner"), parses_verdicts=True,
    ),
    Stage(
        name="judgment_elo",
        summary="positional weights over the iteration, battle matrices, Elo of each judgment (sec. 2.2)",
        inputs=("meta_judgments", "judgments"),
        settings=lambda config, t: {
            "battle_rule": _settings(config, t).battle_rule,
            # The weights apply to the paper's weighted wins only (an agreed win holds in both positions).
            "positional_weights": _settings(config, t).positional_weights
            if _settings(config, t).battle_rule == "weighted" else None},
        schema=JUDGMENT_ELO, runner=runners.judgment_elo, dataset_context="evaluation",
        report_columns=("response_id", "elo"),
    ),
    Stage(
        name="judge_pairs",
        summary="highest vs lowest Elo judgment of each judged response, judge-length filter (sec. 2.2, A.3)",
        inputs=("prompts", "responses", "judgments", "judgment_elo"),
        settings=lambda config, t: {"max_chosen_chars": _settings(config, t).max_chosen_judgment_chars,
                                    "seed": config.seed},
        schema=JUDGE_PAIRS, runner=runners.judge_pairs, dataset_context="training", report_columns=("prompt_id",),
    ),
    Stage(
        name="dpo_dataset",
        summary="actor pairs, plus judge pairs in the iterations that train the judge (sec. 3.1)",
        inputs=("actor_pairs", "judge_pairs"), optional_inputs=("judge_pairs",),
        settings=lambda config, t: {"train_judge": bool(_settings(config, t).train_judge)},
        schema=DPO_DATASET, runner=runners.dpo_dataset, dataset_context="training", report_columns=("prompt_id",),
    ),
    Stage(
        name="checkpoint",
        summary="DPO of M_t into M_{t+1} with TRL; the table is the training log (A.3)",
        inputs=("dpo_dataset",),
        settings=lambda config, t: {"dpo": _settings(config, t).dpo, **_trained_model(config),
                                    "on_empty_preferences": config.on_empty_preferences},
        schema=TRAINING_LOG, runner=runners.checkpoint, model="policy", writes_model=True,
    ),
)
"""The stages of an iteration, in the order it runs them (paper Fig. 1)."""

EVALUATION_STAGES: tuple[Stage, ...] = (
    Stage(
        name="eval_prompts",
        summary="held-out prompts (evaluation.prompts), none of them a training prompt",
        inputs=(),
        settings=lambda config, t: {
            "prompt_file": ContentFile.of(_evaluation(config).prompts.path),
            "column": _evaluation(config).prompts.column, "num_prompts": _evaluation(config).num_prompts,
            "seed": config.seed, "training_file": ContentFile.of(config.prompts.path),
            "training_column": config.prompts.column},
        schema=PROMPTS, runner=runners.eval_prompts, dataset_context="evaluation",
    ),
    Stage(
        name="eval_answers",
        summary="M_{t+1}: one answer per held-out prompt",
        inputs=("eval_prompts",),
        settings=lambda config, t: _answer_settings(config),
        schema=RESPONSES, runner=runners.answers, model="trained", dataset_context="evaluation",
    ),
    Stage(
        name="reference_answers",
        summary="the reference (M_t or M_1): one answer per held-out prompt",
        inputs=("eval_prompts",),
        settings=lambda config, t: _answer_settings(config),
        schema=RESPONSES, runner=runners.answers, model="reference", dataset_context="evaluation",
    ),
    Stage(
        name="win_rate",
        summary="evaluator (A.2 prompt) on both orders of each answer pair: win rate, LC win rate, 95% CIs",
        inputs=("eval_prompts", "eval_answers", "reference_answers"), optional_inputs=("reference_answers",),
        settings=lambda config, t: {
            "reference_outputs": ContentFile.of(_evaluation(config).reference_outputs)
            if _evaluation(config).reference == "outputs" else None,
            "evaluator": evaluator_settings(config), "bootstrap": _evaluation(config).bootstrap, "seed": config.seed},
        schema=EVAL_COMPARISONS, runner=runners.win_rate, model="evaluator", dataset_context="evaluation",
        report_columns=("preference", "identical"), parses_verdicts=True,
    ),
)
"""After an iteration's training, when the config has an evaluation section: M_{t+1} against a reference."""

STAGES: tuple[Stage, ...] = SEED_STAGES + ITERATION_STAGES + EVALUATION_STAGES
"""Every stage, in the order a campaign runs them."""

STAGE: dict[str, Stage] = {stage.name: stage for stage in STAGES}
"""The registry by name."""

_JUDGE_TRAINING = ("meta_judgments", "judgment_elo", "judge_pairs")


def why_not_run(config: CampaignConfig, name: str, iteration: int) -> str | None:
    """Why stage `name` does not run in `iteration` of config (0: the seed's stage 0), or None when it runs: no
    sft or evaluation section, reference answers given as a file, or an iteration that does not train the judge
    (the meta-judge's stages then have nothing to feed)."""
    stage = STAGE[name]
    if stage in SEED_STAGES and config.sft is None:
        return f"{config.name} has no sft section: its seed M_1 is model.path, no SFT stage runs"
    if stage in EVALUATION_STAGES and config.evaluation is None:
        return f"{config.name} has no evaluation section: no win-rate stage runs"
    if name == "reference_answers" and config.evaluation.reference == "outputs":
        return ("the reference answers are the file evaluation.reference_outputs "
                f"({config.evaluation.reference_outputs})")
    if name in _JUDGE_TRAINING and not _settings(config, iteration).train_judge:
        reason = "mode self_rewarding has no meta-judge" if config.mode == "self_rewarding" else "train_judge is false"
        return f"iteration {iteration} does not train the judge ({reason})"
    return None


def stage(name: str) -> Stage:
    """The stage called `name`; KeyError naming the known stages when there is none (a misspelling fails)."""
    try:
        return STAGE[name]
    except KeyError:
        raise KeyError(f"no stage {name!r}; the stages are {list(STAGE)}") from None


NOT_IN_ANY_TABLE: dict[str, str] = {
    "name": "where artifacts and runs are filed, not what they hold",
    "model.path": "the model is identified by its content digest (model_id), part of every model stage's key",
    "artifact_root": "where artifacts are stored",
    "inference.base_url": "where the model is served (the served model is api_model, or the model itself)",
    "inference.api_key_env": "a credential's name",
    "inference.vllm_python": "which interpreter runs vLLM's servers",
    "inference.replicas": "how many engines serve the same model",
    "inference.max_concurrency": "how many requests are in flight",
    "inference.max_retries": "how often a failed request is retried",
    "inference.request_timeout_s": "how long a request may take",
    "inference.startup_timeout_s": "how long an engine may take to start",
    "inference.torch_threads": "CPU threads of the transformers backend (speed only)",
    "tracking.enabled": "MLflow logging reads finished tables; it writes none",
    "tracking.uri": "MLflow logging reads finished tables; it writes none",
    "tracking.experiment": "MLflow logging reads finished tables; it writes none",
    "tracking.artifact_location": "MLflow logging reads finished tables; it writes none",
    "tracking.registered_model": "MLflow logging reads finished tables; it writes none",
    "orchestration.shard_deployment": "where a shard runs, not what it computes",
    "orchestration.shard_poll_interval_s": "how often shard flow runs are polled",
    "orchestration.shard_timeout_s": "how long a stage waits for its shard flow runs",
    "orchestration.ray_address": "where a job runs, not what it computes",
    "orchestration.placement_timeout_s": "how long engine replicas may wait for GPUs",
    "orchestration.training_max_failures": "how often a Ray Train gang restarts from its last checkpoint",
    "orchestration.retries": "how often a failed job is tried again",
    "orchestration.retry_backoff_s": "how long before a failed job is tried again",
    "orchestration.lease_ttl_s": "how long a dead run's lease keeps others out, not what a job computes",
    "orchestration.lease_wait_s": "how long a run waits for another run of the campaign",
    "health.max_top_score_share": "decides whether the checkpoint stage runs, not what any stage computes",
    "health.max_position_a_share": "decides whether the checkpoint stage runs, not what any stage computes",
    "health.min_parse_rate": "decides whether the checkpoint stage runs, not what any stage computes",
    "health.action": "decides whether the checkpoint stage runs, not what any stage computes",
    "health.ask_timeout_s": "how long a person has to decide; the decision itself reaches the DPO set's inputs",
    "health.on_timeout": "a decision, which reaches the DPO set's inputs (judge pairs dropped) or skips training",
    "health.audit_samples": "how many prompts the judge audit shows; the audit is no stage's table",
    **{f"{section}.{field}": reason for section in ("iterations[].dpo", "sft") for field, reason in {
        "save_steps": "how often a training keeps a checkpoint to resume from (a resumed training ends with the "
                      "weights of an uninterrupted one)",
        "activation_checkpointing": "whether activations are recomputed in the backward pass (memory, not weights)",
    }.items()},
    "evaluation.evaluator.model.path": "the evaluator is identified by its weights' digest, in the win_rate key",
    "evaluation.reference": "which model answers as the reference (M_t or M_1): its digest is in the "
                            "reference_answers key; a file of outputs is in the win_rate key",
    "evaluation.evaluator.allow_trained_model": "decides whether the win-rate stage may run, not what it computes",
}
NOT_IN_ANY_TABLE.update({f"evaluation.evaluator.{field}": reason for field, reason in NOT_IN_ANY_TABLE.items()
                         if field.startswith("inference.")})
"""Config fields that no stage's settings read, each with the reason it cannot change a table (the evaluator's
engine is placed and paced by the same fields as the campaign's)."""
