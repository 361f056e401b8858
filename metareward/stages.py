"""The stage registry: every stage of an iteration defined once, in the order of the paper's Figure 1.

A stage's entry says what it reads (input stages), what it depends on (`settings`: one function of the config
and the iteration whose result is both hashed into the stage's cache key and passed to its runner as keyword
arguments, so the key cannot forget what the runner uses), what it writes (schema), how it runs (sharded by
prompts or not, with the model M_t or not), how MLflow shows it (dataset context, report columns) and who
computes it (runner). Tasks, cache keys, manifests, tracking and the summary table are all derived from here.

Adding a stage: one `Stage` entry below, its runner in `metareward/runners.py`, and one line in
`flows/iteration.py`; a config field that no stage reads goes into NOT_IN_ANY_TABLE with the reason.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import polars as pl

from metareward import runners
from metareward.config import CampaignConfig
from metareward.tables import (
    ACTOR_PAIRS,
    DPO_DATASET,
    JUDGE_PAIRS,
    JUDGMENT_ELO,
    JUDGMENTS,
    META_JUDGMENTS,
    PROMPTS,
    RESPONSES,
    ContentFile,
)
from metareward.training import TRAINING_LOG

Settings = Callable[[CampaignConfig, int], dict[str, Any]]


@dataclass(frozen=True)
class Stage:
    """One stage of an iteration. `runner(context, **settings(config, t))` returns (table, StageStats).

    inputs: the stages whose tables it reads (optional_inputs may be absent); sharded: one job per shard of
    prompts, reading the same shard of sharded inputs; uses_model: runs M_t (its digest is in the key);
    writes_model: leaves a model folder beside its table (model_id.txt last); dataset_context: MLflow's
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
    uses_model: bool = False
    optional_inputs: tuple[str, ...] = ()
    dataset_context: str | None = None
    report_columns: tuple[str, ...] = ()
    parses_verdicts: bool = False
    writes_model: bool = False
    version: int = 1

    @property
    def required_inputs(self) -> tuple[str, ...]:
        """The input stages every job of this stage needs (the others are optional)."""
        return tuple(name for name in self.inputs if name not in self.optional_inputs)


def engine_settings(config: CampaignConfig) -> dict[str, Any]:
    """What of the engine changes the model's outputs: backend, weights dtype, chat template, context length,
    and per backend its batch composition (transformers pads batches), server arguments (vllm) or served
    model name and tokenizer (openai). Where and how fast the engine runs is in NOT_IN_ANY_TABLE."""
    inference = config.inference
    engine: dict[str, Any] = {"backend": inference.backend, "dtype": config.model.dtype,
                              "chat_template": config.model.chat_template, "max_model_len": inference.max_model_len}
    if inference.backend == "transformers":
        engine["batch_size"] = inference.batch_size
    elif inference.backend == "vllm":
        engine["vllm_args"] = list(inference.vllm_args)
    else:
        engine.update(api_model=inference.api_model, tokenizer=inference.tokenizer)
    return engine


def _settings(config: CampaignConfig, iteration: int):
    return config.iterations[iteration - 1]


STAGES: tuple[Stage, ...] = (
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
            "seed": config.seed, "shard_size": config.shard_size, "engine": engine_settings(config)},
        schema=RESPONSES, runner=runners.responses, sharded=True, uses_model=True, dataset_context="generation",
        report_columns=("response_id", "n_chars", "n_tokens"),
    ),
    Stage(
        name="judgments",
        summary="judge: N judgments per response with the A.1 prompt, `Score: X` parsed (sec. 2.1)",
        inputs=("prompts", "responses"),
        settings=lambda config, t: {
            "num_judgments": _settings(config, t).num_judgments, "sampling": _settings(config, t).judge_sampling,
            "seed": config.seed, "verdict_mode": config.inference.verdict_mode, "engine": engine_settings(config)},
        schema=JUDGMENTS, runner=runners.judgments, sharded=True, uses_model=True, dataset_context="evaluation",
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
            "verdict_mode": config.inference.verdict_mode, "engine": engine_settings(config)},
        schema=META_JUDGMENTS, runner=runners.meta_judgments, sharded=True, uses_model=True,
        dataset_context="evaluation", report_columns=("first_id", "second_id", "winner"), parses_verdicts=True,
    ),
    Stage(
        name="judgment_elo",
        summary="positional weights over the iteration, battle matrices, Elo of each judgment (sec. 2.2)",
        inputs=("meta_judgments", "judgments"),
        settings=lambda config, t: {},
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
        settings=lambda config, t: {
            "dpo": _settings(config, t).dpo, "dtype": config.model.dtype, "chat_template": config.model.chat_template,
            "seed": config.seed, "on_empty_preferences": config.on_empty_preferences},
        schema=TRAINING_LOG, runner=runners.checkpoint, uses_model=True, writes_model=True,
    ),
)
"""Every stage, in the order an iteration runs them (paper Fig. 1)."""

STAGE: dict[str, Stage] = {stage.name: stage for stage in STAGES}
"""The registry by name."""


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
    "inference.gpus": "how many engines serve the same model",
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
    "orchestration.retries": "how often a failed job is tried again",
    "orchestration.retry_backoff_s": "how long before a failed job is tried again",
    "health.max_top_score_share": "decides whether the checkpoint stage runs, not what any stage computes",
    "health.max_position_a_share": "decides whether the checkpoint stage runs, not what any stage computes",
    "health.min_parse_rate": "decides whether the checkpoint stage runs, not what any stage computes",
    "health.action": "decides whether the checkpoint stage runs, not what any stage computes",
}
"""Config fields that no stage's settings read, each with the reason it cannot change a table."""
