"""The runner of each stage: reads the stage's input tables from its context, calls the paper's arithmetic or the
model with exactly the settings the registry hashed into the stage's key, and returns (table, StageStats).

Every keyword argument of a runner is one key of its stage's `settings` (metareward/pipeline/stages.py); the context
gives only what is not a setting: the input tables, the shard, the iteration, the model M_t and how to reach
an engine. A runner's code fingerprint covers what it reaches by name (metareward/pipeline/fingerprints.py), so it
names its engine (`shared_backend`) rather than receiving one.
"""

from __future__ import annotations

import logging
import tempfile
from typing import Any

import polars as pl

from metareward.artifacts.stats import StageStats
from metareward.artifacts.tables import ContentFile, select_iteration_prompts
from metareward.config.campaign import DPOConfig, ModelConfig, SamplingConfig, TrainingConfig
from metareward.inference.engines import close_shared_backends, shared_backend
from metareward.inference.roles import compare_answers, generate_responses, judge_responses, meta_judge
from metareward.paper.preferences import (
    build_dpo_dataset,
    meta_judged_judgments,
    rank_judgments,
    score_responses,
    select_actor_pairs,
    select_judge_pairs,
    select_judged_responses,
)
from metareward.paper.win_rate import win_rates
from metareward.pipeline.context import StageContext
from metareward.pipeline.input_files import (
    InputFileError,
    held_out_prompts,
    load_prompts,
    load_reference_outputs,
    load_sft_examples,
)
from metareward.placement.gang import GangTraining, train_on_cluster
from metareward.placement.replicas import ray_address
from metareward.training.checkpoints import CheckpointStore
from metareward.training.logs import TRAINING_LOG, training_log_table
from metareward.training.models import MODEL_DIGEST_FILE
from metareward.training.trainer import EmptyPreferenceSetError, EmptyTrainingSetError, train_dpo, train_sft

Result = tuple[pl.DataFrame, StageStats]

log = logging.getLogger(__name__)


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
    # Only the columns the arithmetic reads: a judgment's text alone is most of an iteration's bytes.
    scores = score_responses(context.table("judgments", ["prompt_id", "response_id", "score"]))
    response_table = context.table("responses", ["prompt_id", "response_id", "sample_idx", "text", "n_chars"])
    return select_actor_pairs(response_table, scores, context.table("prompts", ["prompt_id", "prompt"]), rho,
                              max_chosen_chars, context.iteration, context.model_id or "")


def meta_judgments(context: StageContext, *, sampling: SamplingConfig, seed: int, verdict_mode: str,
                   engine: dict[str, Any], sees_scores: bool, judged_responses: str) -> Result:
    """Meta-judge: both orders of every pair of valid judgments of each judged response of this shard (the
    highest-variance one per prompt, or all), the judgments shown with or without their score line; a judgment
    that repeats an earlier one's text is not compared (counted as identical_judgments)."""
    judgment_table = context.table("judgments")
    judged = select_judged_responses(score_responses(judgment_table), seed, judged_responses)
    compared, identical = meta_judged_judgments(judgment_table, judged)
    table, stats = meta_judge(judged, compared, context.table("responses"), context.table("prompts"),
                              _engine(context, engine, seed), sampling, seed, verdict_mode, context.iteration,
                              context.model_id or "", sees_scores=sees_scores)
    stats.counts["identical_judgments"] = identical
    return table, stats


def judgment_elo(context: StageContext, *, battle_rule: str, positional_weights: bool | None) -> Result:
    """Elo of every meta-judged judgment: the paper's weighted wins (positional weights counted over the whole
    iteration, or ½ each) or NeMo-Aligner's wins in both orders."""
    columns = ["prompt_id", "response_id", "first_id", "second_id", "winner"]
    meta_shards = [context.store.read_table(table, columns) for table in context.inputs["meta_judgments"]]
    # Only the meta-judged responses' judgments are read (rank_judgments joins on them), each shard's in its shard.
    judgment_table = _rows_by_shard(context, "judgments", "response_id",
                                    [shard["response_id"].unique() for shard in meta_shards],
                                    ["judgment_id", "sample_idx", "score"])
    return rank_judgments(pl.concat(meta_shards), judgment_table, context.iteration, context.model_id or "",
                          positional=bool(positional_weights), battle_rule=battle_rule)


def judge_pairs(context: StageContext, *, max_chosen_chars: int | None, seed: int) -> Result:
    """Judge preference pairs of the whole iteration."""
    elo = context.table("judgment_elo", ["prompt_id", "response_id", "judgment_id", "elo"])
    # Of the other tables only the rows of the judged responses and their prompts are read: the pairs join them and
    # nothing else.
    judged = _keys_by_shard(context, "responses", "response_id", elo["response_id"].unique())
    judgment_table = _rows_by_shard(context, "judgments", "response_id", judged, ["judgment_id", "text", "n_chars"])
    response_table = _rows_by_shard(context, "responses", "response_id", judged, ["response_id", "text"])
    prompt_table = _rows_by_shard(context, "prompts", "prompt_id", [elo["prompt_id"].unique()], ["prompt_id", "prompt"])
    return select_judge_pairs(elo, judgment_table, response_table, prompt_table, max_chosen_chars, seed,
                              context.iteration, context.model_id or "")


def dpo_dataset(context: StageContext, *, train_judge: bool) -> Result:
    """The DPO training set of the iteration."""
    columns = ["prompt_id", "prompt", "chosen", "rejected", "iteration", "model_id"]
    judge = context.table("judge_pairs", columns) if context.has("judge_pairs") else None
    return build_dpo_dataset(context.table("actor_pairs", columns), judge, train_judge)


def _rows_by_shard(context: StageContext, input_stage: str, key: str, shard_keys: list[pl.Series],
                   columns: list[str]) -> pl.DataFrame:
    """The rows of each shard of the job's input table of input_stage whose `key` is one of that shard's
    `shard_keys` (one list per shard, in shard order), only `columns`: each shard checked and filtered as it is read
    (ArtifactStore.read_tables_where). The sharded stages of an iteration shard the same prompts in the same order,
    so shard i of one holds the rows of shard i of another; looking a shard's keys up in that shard alone keeps the
    cost linear in the iteration (all keys against every shard would grow with its square). ValueError when the
    shard counts differ."""
    tables = context.inputs[input_stage]
    if len(tables) != len(shard_keys):
        raise ValueError(f"{context.stage}: {input_stage} has {len(tables)} shards, its keys come in {len(shard_keys)}")
    return pl.concat([context.store.read_tables_where([table], pl.col(key).is_in(keys.implode()), columns)
                      for table, keys in zip(tables, shard_keys, strict=True)], how="vertical")


def _keys_by_shard(context: StageContext, input_stage: str, key: str, wanted: pl.Series) -> list[pl.Series]:
    """Of the `wanted` values of column `key`, those in each shard of the job's input table of input_stage, in shard
    order (only the key column is read), for _rows_by_shard."""
    located = pl.concat([context.store.read_table(table, [key]).with_columns(pl.lit(index).alias("shard"))
                         for index, table in enumerate(context.inputs[input_stage])])
    found = located.join(wanted.to_frame(key), on=key, how="semi").partition_by("shard", as_dict=True)
    return [found[(index,)][key] if (index,) in found else wanted.clear()
            for index in range(len(context.inputs[input_stage]))]


def sft_data(context: StageContext, *, sft_file: ContentFile) -> Result:
    """The seed's SFT examples from the user's file, checked (input_files.load_sft_examples)."""
    examples = load_sft_examples(sft_file.path).with_columns(
        pl.lit(context.iteration, pl.Int32).alias("iteration"), pl.lit(None, pl.String).alias("model_id"))
    return examples, StageStats("sft_data", rows=examples.height)


def sft(context: StageContext, *, training: TrainingConfig, dtype: str, chat_template: str | None,
        seed: int) -> Result:
    """SFT of the base model into M_1; the model folder is uploaded beside the table, model_id.txt last."""
    try:
        return _trained(context, "sft", context.table("sft_data"), training, dtype, chat_template, seed)
    except EmptyTrainingSetError as error:
        raise EmptyTrainingSetError(f"seed SFT: {error}; raise sft.max_length or shorten the examples") from None


def checkpoint(context: StageContext, *, dpo: DPOConfig, dtype: str, chat_template: str | None, seed: int,
               on_empty_preferences: str) -> Result:
    """DPO of M_t into M_{t+1}; the model folder is uploaded beside the table, model_id.txt last. With no
    trainable pair: stop (EmptyPreferenceSetError), or keep M_t as M_{t+1} (`on_empty_preferences`)."""
    try:
        return _trained(context, "dpo", context.table("dpo_dataset"), dpo, dtype, chat_template, seed)
    except EmptyPreferenceSetError as error:
        if on_empty_preferences == "stop":
            raise EmptyPreferenceSetError(
                f"iteration {context.iteration}: {error}; the campaign stops before training on nothing "
                "(set on_empty_preferences: keep_model to carry M_t forward instead)"
            ) from None
        stats = StageStats("checkpoint")
        stats.counts.update(model_uri=context.model.uri, model_id=context.model.model_id, kept_previous_model=1)
        return pl.DataFrame(schema=TRAINING_LOG), stats


def _trained(context: StageContext, kind: str, examples: pl.DataFrame, settings: TrainingConfig, dtype: str,
             chat_template: str | None, seed: int) -> Result:
    """Train M_t on `examples` with no inference engine holding the accelerator (vLLM does not free memory
    in-process) — as a Ray Train gang when a Ray cluster is set, else here — keeping checkpoints under the job's
    key to resume from; the model ends up beside the job's table (model_id.txt last). TRL's log and the stats."""
    close_shared_backends()
    checkpoints = CheckpointStore(context.store.root, context.checkpoints_key)
    step = checkpoints.latest() if settings.save_steps else None
    if step is not None:
        log.warning("%s iter-%d: %s resumes from the checkpoint of step %d (%s)", context.stage, context.iteration,
                    kind.upper(), step, checkpoints.uri(step))
    address = ray_address(context.orchestration)
    if address:
        orchestration = context.orchestration
        gang = GangTraining(kind, context.model.uri, examples, settings, seed, dtype, chat_template, checkpoints,
                            context.model_key)
        result, model_uri = train_on_cluster(address, gang, orchestration.placement_timeout_s,
                                             orchestration.training_max_failures)
    else:
        train = train_dpo if kind == "dpo" else train_sft
        with tempfile.TemporaryDirectory(prefix="metareward-train-") as scratch:
            result = train(context.local_model(), examples, settings, scratch, seed, dtype, chat_template, checkpoints)
            model_uri = context.store.put_folder(result.checkpoint, context.model_key, last=MODEL_DIGEST_FILE)
    if result.reference_reused:
        log.warning("%s iter-%d: DPO read the reference log-probs kept at %s instead of computing them again",
                    context.stage, context.iteration, checkpoints.uri())
    stats = StageStats(context.stage, rows=len(result.log_history), seconds=result.seconds)
    stats.counts.update(result.summary, model_uri=model_uri, model_id=result.model_id,
                        pairs_trained=result.pairs_trained, pairs_too_long=result.pairs_too_long,
                        resumed_from_step=result.resumed_from_step)
    return training_log_table(result.log_history, kind), stats


def eval_prompts(context: StageContext, *, prompt_file: ContentFile, column: str, num_prompts: int | None,
                 seed: int, training_file: ContentFile, training_column: str) -> Result:
    """The held-out prompts, a seeded sample of num_prompts (None: all); InputFileError when one of them is a
    prompt of the training file."""
    held_out = held_out_prompts(prompt_file.path, column, training_file.path, training_column)
    picked = select_iteration_prompts(held_out.table, seed, [num_prompts])
    return picked, StageStats("eval_prompts", rows=picked.height, counts={"file_prompts": held_out.table.height})


def answers(context: StageContext, *, sampling: SamplingConfig, seed: int, engine: dict[str, Any]) -> Result:
    """The stage's model (M_{t+1}, or the reference) answers each held-out prompt once."""
    return generate_responses(context.table("eval_prompts"), _engine(context, engine, seed), 1, sampling, seed,
                              context.iteration, context.model_id or "")


def win_rate(context: StageContext, *, reference_outputs: ContentFile | None, evaluator: dict[str, Any],
             bootstrap: int, seed: int) -> Result:
    """The evaluator's verdicts on M_{t+1}'s answer against the reference's (the reference_answers stage, or the
    file of reference outputs) for each held-out prompt, in both orders, and the win rates with their CIs.
    A prompt the trained model or the reference did not answer (too long for the context) counts as an empty
    answer; InputFileError when the reference outputs lack a prompt."""
    prompts = context.table("eval_prompts")
    trained = context.table("eval_answers")
    if reference_outputs is not None:
        given = load_reference_outputs(reference_outputs.path)
        missing = [prompt for prompt_id, prompt in prompts.select("prompt_id", "prompt").iter_rows()
                   if prompt_id not in given]
        if missing:
            raise InputFileError(f"{reference_outputs.path}: no reference output for {len(missing)} evaluated "
                                 f"prompt(s), e.g. {missing[0][:80]!r}")
        references = pl.DataFrame({"prompt_id": list(given), "reference": list(given.values())})
    else:
        references = context.table("reference_answers").select("prompt_id", reference="text")
    pairs = (prompts.join(trained.select("prompt_id", trained="text"), on="prompt_id", how="left")
             .join(references, on="prompt_id", how="left"))
    unanswered = pairs.filter(pl.col("trained").is_null() | pl.col("reference").is_null()).height
    pairs = pairs.with_columns(pl.col("trained", "reference").fill_null(""))
    model_id = trained["model_id"][0] if trained.height else ""
    backend = _engine(context, evaluator["engine"], seed, local=evaluator["weights"])
    table, stats = compare_answers(pairs, backend, evaluator["verdict_mode"], evaluator["max_tokens"] or 1, seed,
                                   context.iteration, model_id, context.model.model_id)
    rates = win_rates(table, bootstrap, seed)
    stats.counts.update(rates.as_counts() if rates else {}, unanswered_prompts=unanswered,
                        trained_mean_chars=float(pairs["trained"].str.len_chars().mean()),
                        reference_mean_chars=float(pairs["reference"].str.len_chars().mean()),
                        evaluator=context.model.uri, evaluator_id=context.model.model_id)
    return table, stats


def _engine(context: StageContext, engine: dict[str, Any], seed: int, local: bool = True):
    """The process's engine for the stage's model built from the hashed engine settings; where it runs comes from
    the context's inference settings (base_url, GPUs, concurrency, timeouts). `local` false: an endpoint's
    model, named by its api_model, with no weights to fetch."""
    model = ModelConfig(path=context.model.uri, dtype=engine["dtype"], chat_template=engine["chat_template"])
    outputs = {name: value for name, value in engine.items() if name not in ("dtype", "chat_template")}
    inference = context.inference.model_copy(update=outputs)
    return shared_backend(model, inference, context.local_model() if local else context.model.uri, seed=seed)
