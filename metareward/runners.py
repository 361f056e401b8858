"""The runner of each stage: reads the stage's input tables from its context, calls the paper's arithmetic or the
model with exactly the settings the registry hashed into the stage's key, and returns (table, StageStats).

Every keyword argument of a runner is one key of its stage's `settings` (metareward/stages.py); the context
gives only what is not a setting: the input tables, the shard, the iteration, the model M_t and how to reach
an engine. A runner's code fingerprint covers what it reaches by name (metareward/fingerprints.py), so it
names its engine (`shared_backend`) rather than receiving one.
"""

from __future__ import annotations

import tempfile
from typing import Any

import polars as pl

from metareward.config import DPOConfig, ModelConfig, SamplingConfig
from metareward.context import StageContext
from metareward.inference import close_shared_backends, shared_backend
from metareward.models import MODEL_DIGEST_FILE
from metareward.preferences import (
    build_dpo_dataset,
    rank_judgments,
    score_responses,
    select_actor_pairs,
    select_judge_pairs,
    select_judged_responses,
)
from metareward.roles import generate_responses, judge_responses, meta_judge
from metareward.stats import StageStats
from metareward.tables import ContentFile, load_prompts, select_iteration_prompts
from metareward.training import TRAINING_LOG, EmptyPreferenceSetError, train_dpo, training_log_table

Result = tuple[pl.DataFrame, StageStats]


def prompts(context: StageContext, *, prompt_file: ContentFile, column: str, seed: int,
            block_sizes: list[int | None]) -> Result:
    """The iteration's block of the prompt file (see select_iteration_prompts); the file's empty and duplicate
    prompts, which no iteration gets, are counted."""
    prompt_set = load_prompts(prompt_file.path, column)
    picked = select_iteration_prompts(prompt_set.table, seed, block_sizes)
    return picked, StageStats("prompts", rows=picked.height, counts={
        "file_prompts": prompt_set.table.height, "empty_prompts": len(prompt_set.empty_rows),
        "duplicate_prompts": len(prompt_set.duplicate_rows)})


def responses(context: StageContext, *, num_responses: int, sampling: SamplingConfig, seed: int, shard_size: int,
              engine: dict[str, Any]) -> Result:
    """Actor: K responses for each prompt of this shard."""
    shard = context.table("prompts").slice(context.shard_index * shard_size, shard_size)
    return generate_responses(shard, _engine(context, engine, seed), num_responses, sampling, seed,
                              context.iteration, context.model_id or "")


def judgments(context: StageContext, *, num_judgments: int, sampling: SamplingConfig, seed: int,
              verdict_mode: str, engine: dict[str, Any]) -> Result:
    """Judge: N judgments of each response of this shard."""
    return judge_responses(context.table("responses"), context.table("prompts"), _engine(context, engine, seed),
                           num_judgments, sampling, seed, verdict_mode, context.iteration, context.model_id or "")


def actor_pairs(context: StageContext, *, rho: float, max_chosen_chars: int | None) -> Result:
    """Actor preference pairs of the whole iteration."""
    scores = score_responses(context.table("judgments"))
    return select_actor_pairs(context.table("responses"), scores, context.table("prompts"), rho, max_chosen_chars,
                              context.iteration, context.model_id or "")


def meta_judgments(context: StageContext, *, sampling: SamplingConfig, seed: int, verdict_mode: str,
                   engine: dict[str, Any]) -> Result:
    """Meta-judge: both orders of every pair of valid judgments of each judged response of this shard."""
    judged_table = context.table("judgments")
    judged = select_judged_responses(score_responses(judged_table), seed)
    return meta_judge(judged, judged_table, context.table("responses"), context.table("prompts"),
                      _engine(context, engine, seed), sampling, seed, verdict_mode, context.iteration,
                      context.model_id or "")


def judgment_elo(context: StageContext) -> Result:
    """Elo of every meta-judged judgment, positional weights counted over the whole iteration."""
    return rank_judgments(context.table("meta_judgments"), context.table("judgments"), context.iteration,
                          context.model_id or "")


def judge_pairs(context: StageContext, *, max_chosen_chars: int | None, seed: int) -> Result:
    """Judge preference pairs of the whole iteration."""
    return select_judge_pairs(context.table("judgment_elo"), context.table("judgments"), context.table("responses"),
                              context.table("prompts"), max_chosen_chars, seed, context.iteration, context.model_id or "")


def dpo_dataset(context: StageContext, *, train_judge: bool) -> Result:
    """The DPO training set of the iteration."""
    judge = context.table("judge_pairs") if context.has("judge_pairs") else None
    return build_dpo_dataset(context.table("actor_pairs"), judge, train_judge)


def checkpoint(context: StageContext, *, dpo: DPOConfig, dtype: str, chat_template: str | None, seed: int,
               on_empty_preferences: str) -> Result:
    """DPO of M_t into M_{t+1}; the model folder is uploaded beside the table, model_id.txt last. With no
    trainable pair: stop (EmptyPreferenceSetError), or keep M_t as M_{t+1} (`on_empty_preferences`)."""
    dataset = context.table("dpo_dataset")
    stats = StageStats("checkpoint")
    # Training needs the accelerator: no inference engine may hold it (vLLM does not free memory in-process).
    close_shared_backends()
    with tempfile.TemporaryDirectory(prefix="metareward-train-") as scratch:
        try:
            result = train_dpo(context.local_model(), dataset, dpo, scratch, seed, dtype, chat_template)
        except EmptyPreferenceSetError as error:
            if on_empty_preferences == "stop":
                raise EmptyPreferenceSetError(
                    f"iteration {context.iteration}: {error}; the campaign stops before training on nothing "
                    "(set on_empty_preferences: keep_model to carry M_t forward instead)"
                ) from None
            stats.counts.update(model_uri=context.model.uri, model_id=context.model.model_id, kept_previous_model=1)
            return pl.DataFrame(schema=TRAINING_LOG), stats
        model_uri = context.store.put_folder(result.checkpoint, context.model_key, last=MODEL_DIGEST_FILE)
    stats.rows = len(result.log_history)
    stats.seconds = result.seconds
    stats.counts.update(result.summary, model_uri=model_uri, model_id=result.model_id,
                        pairs_trained=result.pairs_trained, pairs_too_long=result.pairs_too_long)
    return training_log_table(result.log_history), stats


def _engine(context: StageContext, engine: dict[str, Any], seed: int):
    """The process's engine for M_t built from the hashed engine settings; where it runs comes from the
    context's inference settings (base_url, GPUs, concurrency, timeouts)."""
    model = ModelConfig(path=context.model.uri, dtype=engine["dtype"], chat_template=engine["chat_template"])
    outputs = {name: value for name, value in engine.items() if name not in ("dtype", "chat_template")}
    inference = context.inference.model_copy(update=outputs)
    return shared_backend(model, inference, context.local_model(), seed=seed)
