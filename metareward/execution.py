"""Running one job of an iteration: return the stored result if it is complete, else compute, write, mark done."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable

import polars as pl

from metareward.config import CampaignConfig
from metareward.inference import close_shared_backends, shared_backend
from metareward.models import MODEL_DIGEST_FILE, resolve_model
from metareward.pipeline import Job, JobResult, complete, finished, read_tables, select_iteration_prompts
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
from metareward.store import ArtifactStore
from metareward.training import TRAINING_LOG, EmptyPreferenceSetError, train_dpo, training_log_table

JobListener = Callable[[Job, JobResult], None]
_listeners: list[JobListener] = []


def add_job_listener(listener: JobListener) -> None:
    """Call listener(job, result) after every job this process runs or finds cached (progress bars)."""
    _listeners.append(listener)


def remove_job_listener(listener: JobListener) -> None:
    """Stop calling a listener added with add_job_listener."""
    _listeners.remove(listener)


FAULT_ENVIRONMENT = "METAREWARD_INJECT_FAULT"
"""Test-only: "STAGE:SHARD" (e.g. "judgments:shard-0001") makes that job's first attempt in this process
fail after its inputs are read, to exercise retries. Never set in production."""
_faults_raised: set[str] = set()


class InjectedFault(RuntimeError):
    """The failure METAREWARD_INJECT_FAULT asked for."""


def run_job(config: CampaignConfig, job: Job, store: ArtifactStore | None = None) -> JobResult:
    """The job's result: read from the store when its table and marker are there (no model is loaded),
    otherwise computed, written atomically and marked complete."""
    store = store or ArtifactStore(config.artifact_root)
    result = finished(store, job)
    target = f"{job.stage}:{job.shard}"
    if result is None and os.environ.get(FAULT_ENVIRONMENT) == target and target not in _faults_raised:
        _faults_raised.add(target)
        raise InjectedFault(f"{FAULT_ENVIRONMENT}={target}: first attempt of {job.run_name} fails on purpose")
    if result is None:
        started = time.perf_counter()
        table, stats = _RUNNERS[job.stage](config, job, store)
        # Everything the stage itself did (reading inputs, loading a model, calling it, building the table);
        # what a run takes beyond the sum of these is orchestration and artifact-store overhead.
        stats.counts["compute_seconds"] = time.perf_counter() - started
        result = complete(store, job, table, stats)
    for listener in list(_listeners):
        listener(job, result)
    return result


def _backend(config: CampaignConfig, job: Job):
    return shared_backend(config.model, config.inference, resolve_model(job.model_path), seed=config.seed)


def _shard_prompts(config: CampaignConfig, job: Job, store: ArtifactStore) -> pl.DataFrame:
    index = int(job.shard.removeprefix("shard-"))
    return read_tables(store, job.inputs["prompts"]).slice(index * config.shard_size, config.shard_size)


def _prompts(config: CampaignConfig, job: Job, store: ArtifactStore):
    table = select_iteration_prompts(config, job.iteration)
    return table, StageStats("prompts", rows=table.height)


def _responses(config: CampaignConfig, job: Job, store: ArtifactStore):
    settings = config.iterations[job.iteration - 1]
    return generate_responses(
        _shard_prompts(config, job, store), _backend(config, job), settings.num_responses, settings.actor_sampling,
        config.seed, job.iteration, job.model_id,
    )


def _judgments(config: CampaignConfig, job: Job, store: ArtifactStore):
    settings = config.iterations[job.iteration - 1]
    return judge_responses(
        read_tables(store, job.inputs["responses"]), read_tables(store, job.inputs["prompts"]), _backend(config, job),
        settings.num_judgments, settings.judge_sampling, config.seed, config.inference.verdict_mode, job.iteration,
        job.model_id,
    )


def _meta_judgments(config: CampaignConfig, job: Job, store: ArtifactStore):
    settings = config.iterations[job.iteration - 1]
    judgments = read_tables(store, job.inputs["judgments"])
    judged = select_judged_responses(score_responses(judgments), config.seed)
    return meta_judge(
        judged, judgments, read_tables(store, job.inputs["responses"]), read_tables(store, job.inputs["prompts"]),
        _backend(config, job), settings.meta_judge_sampling, config.seed, config.inference.verdict_mode,
        job.iteration, job.model_id,
    )


def _judgment_elo(config: CampaignConfig, job: Job, store: ArtifactStore):
    return rank_judgments(
        read_tables(store, job.inputs["meta_judgments"]), read_tables(store, job.inputs["judgments"]),
        job.iteration, job.model_id,
    )


def _actor_pairs(config: CampaignConfig, job: Job, store: ArtifactStore):
    settings = config.iterations[job.iteration - 1]
    judgments = read_tables(store, job.inputs["judgments"])
    return select_actor_pairs(
        read_tables(store, job.inputs["responses"]), score_responses(judgments), read_tables(store, job.inputs["prompts"]),
        settings.rho, settings.max_chosen_response_chars, job.iteration, job.model_id,
    )


def _judge_pairs(config: CampaignConfig, job: Job, store: ArtifactStore):
    settings = config.iterations[job.iteration - 1]
    return select_judge_pairs(
        read_tables(store, job.inputs["judgment_elo"]), read_tables(store, job.inputs["judgments"]),
        read_tables(store, job.inputs["responses"]), read_tables(store, job.inputs["prompts"]),
        settings.max_chosen_judgment_chars, config.seed, job.iteration, job.model_id,
    )


def _dpo_dataset(config: CampaignConfig, job: Job, store: ArtifactStore):
    judge_pairs = read_tables(store, job.inputs["judge_pairs"]) if "judge_pairs" in job.inputs else None
    return build_dpo_dataset(
        read_tables(store, job.inputs["actor_pairs"]), judge_pairs, bool(config.iterations[job.iteration - 1].train_judge)
    )


def _checkpoint(config: CampaignConfig, job: Job, store: ArtifactStore):
    settings = config.iterations[job.iteration - 1]
    dataset = read_tables(store, job.inputs["dpo_dataset"])
    stats = StageStats("checkpoint")
    # Training needs the accelerator: no inference engine may hold it (vLLM does not free memory in-process).
    close_shared_backends()
    with tempfile.TemporaryDirectory(prefix="metareward-train-") as scratch:
        try:
            result = train_dpo(resolve_model(job.model_path), dataset, settings.dpo, scratch, config.seed,
                               config.model.dtype)
        except EmptyPreferenceSetError as error:
            if config.on_empty_preferences == "stop":
                raise EmptyPreferenceSetError(
                    f"iteration {job.iteration}: {error}; the campaign stops before training on nothing "
                    "(set on_empty_preferences: keep_model to carry M_t forward instead)"
                ) from None
            stats.counts.update(model_uri=job.model_path, model_id=job.model_id, kept_previous_model=1)
            return pl.DataFrame(schema=TRAINING_LOG), stats
        model_uri = store.put_folder(result.checkpoint, job.model_key, last=MODEL_DIGEST_FILE)
    stats.rows = len(result.log_history)
    stats.seconds = result.seconds
    stats.counts.update(result.summary, model_uri=model_uri, model_id=result.model_id,
                        pairs_trained=result.pairs_trained, pairs_too_long=result.pairs_too_long)
    return training_log_table(result.log_history), stats


_RUNNERS = {
    "prompts": _prompts,
    "responses": _responses,
    "judgments": _judgments,
    "meta_judgments": _meta_judgments,
    "judgment_elo": _judgment_elo,
    "actor_pairs": _actor_pairs,
    "judge_pairs": _judge_pairs,
    "dpo_dataset": _dpo_dataset,
    "checkpoint": _checkpoint,
}
