"""Cached jobs: one stage of one iteration for one shard — its cache key, its artifacts, and running it (no Prefect).

A job's key hashes what its rows depend on and nothing else: the stage's settings (the registry's settings
function), the digests of its input tables, the model's digest (model stages), the shard, the iteration, and
the code fingerprint of its runner. Its table and a completion marker (written last) sit at
`{campaign}/iter-{t}/{stage}/{shard}-{key}.parquet|.json`; a job whose two files are there is never recomputed.
The seed's stages (SFT of the base model into M_1) sit at `_seed/{stage}/{shard}-{key}` instead, outside every
campaign: their key names no campaign, so campaigns on one artifact root that train the same seed — the paper's
Meta-Rewarding and its Self-Rewarding baseline, both from "SFT on EFT" — share one M_1, byte for byte.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

import polars as pl

from metareward.artifacts.stats import StageStats
from metareward.artifacts.store import ArtifactStore, CorruptArtifactError, TableRef, open_store
from metareward.artifacts.tables import validate_table
from metareward.config.campaign import CampaignConfig
from metareward.host.faults import inject_job_fault
from metareward.host.stopping import raise_if_stopped
from metareward.inference import progress
from metareward.pipeline.context import ModelRef, StageContext
from metareward.pipeline.fingerprints import installed_index
from metareward.pipeline.stages import SEED_STAGES, stage
from metareward.pipeline.superseded import restore
from metareward.placement.replicas import Replica, ray_address, shared_pool
from metareward.training.checkpoints import CheckpointStore
from metareward.training.models import MODEL_DIGEST_FILE

SEED_FOLDER = "_seed"
"""Where the seed stages' jobs live under the artifact root, beside the campaigns (a campaign's name cannot start
with "_"): keyed by their inputs alone, so every campaign with the same base model, SFT data, SFT settings and seed
finds the M_1 the first one trained."""


@dataclass(frozen=True)
class Job:
    """One unit of cached work. `key` is the artifact key without extension; `inputs` the URIs of the tables
    it reads, by input stage; `model` the model M_t it runs (model stages); `model_id` the model behind its
    rows (M_t's digest, or its inputs'); `campaign` the campaign that planned it; `former_key` where a seed stage's
    job of this campaign was kept before seed stages were shared (`{campaign}/iter-0/…`), looked at when `key`
    holds nothing, so that a campaign that trained its M_1 before resumes with it."""

    stage: str
    iteration: int
    shard: str
    cache_key: str
    key: str
    settings_digest: str
    code: str
    inputs: dict[str, list[TableRef]]
    model: ModelRef | None = None
    model_id: str | None = None
    shard_index: int | None = None
    shard_count: int = 1
    campaign: str = ""
    former_key: str | None = None

    @property
    def table_key(self) -> str:
        """Where the job's table goes."""
        return self.key + ".parquet"

    @property
    def marker_key(self) -> str:
        """Where the job's completion marker goes (its presence, with the table's, means done)."""
        return self.key + ".json"

    @property
    def model_key(self) -> str:
        """Where a checkpoint job puts its model folder (model_id.txt, written last, marks it complete)."""
        return self.key + "/model"

    @property
    def checkpoints_key(self) -> str:
        """Where a training job keeps its checkpoints until its model and marker are written."""
        return self.key + "/checkpoints"

    @property
    def run_name(self) -> str:
        """A readable name, e.g. 'judgments iter-2 shard-0007'."""
        return run_name(self.stage, self.iteration, self.shard_index)


@dataclass
class JobResult:
    """What a finished job produced: the job, its table and its statistics (stored with it); `cached` when
    it was found in the store rather than computed by this call, `recomputed` why a stored result was not
    trusted and computed again (its table damaged, its model folder incomplete), `computed_by` the campaign whose
    run computed a stored result (a shared seed stage's may be another campaign's; None when not recorded)."""

    job: Job
    table: TableRef
    stats: dict[str, Any]
    cached: bool = False
    recomputed: str | None = None
    computed_by: str | None = None

    @property
    def model_id(self) -> str | None:
        """The digest of the model behind the table's rows."""
        return self.job.model_id


def run_name(stage_name: str, iteration: int, shard_index: int | None) -> str:
    """'judgments iter-2 shard-0007', or 'actor_pairs iter-2 all' for a stage that is not sharded."""
    return f"{stage_name} iter-{iteration} {shard_label(shard_index)}"


def shard_label(shard_index: int | None) -> str:
    """'shard-0007' for shard 7; 'all' for the single job of a stage that is not sharded."""
    return "all" if shard_index is None else f"shard-{shard_index:04d}"


def sharding(config: CampaignConfig, inputs: Mapping[str, Sequence[JobResult]]) -> int:
    """How many shards a sharded stage reading these inputs has: the iteration's prompts in blocks of
    config.shard_size (every sharded stage reads the prompts table)."""
    return -(-inputs["prompts"][0].table.rows // config.shard_size)


def shard_inputs(inputs: Mapping[str, Sequence[JobResult]], index: int) -> dict[str, list[JobResult]]:
    """What shard `index` of a sharded stage reads: the same shard of every sharded input stage, all of the
    others (e.g. the whole prompts table)."""
    return {name: [results[index]] if stage(name).sharded else list(results) for name, results in inputs.items()}


def settings_digest(settings: Mapping[str, Any]) -> str:
    """A digest of a stage's settings in canonical JSON (pydantic models as their JSON form — a training section
    without the fields that cannot change its weights, TrainingConfig.UNHASHED — a ContentFile as the digest of
    its bytes)."""
    return _digest(json.dumps(settings, sort_keys=True, default=_canonical))


def _canonical(value: Any) -> Any:
    if hasattr(value, "cache_key_form"):
        return value.cache_key_form()
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    if dataclasses.is_dataclass(value) and hasattr(value, "digest"):
        return {"content": value.digest}
    raise TypeError(f"setting of type {type(value).__name__} cannot be hashed into a cache key: {value!r}")


def _digest(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=6).hexdigest()


@cache
def code_fingerprint(stage_name: str) -> str:
    """The code fingerprint of a stage: its registry version and the digest of everything its runner reaches
    (see metareward/pipeline/fingerprints.py), computed once per process."""
    entry = stage(stage_name)
    return f"v{entry.version}-" + installed_index().fingerprint([(entry.runner.__module__, entry.runner.__name__)])


def plan_job(config: CampaignConfig, stage_name: str, iteration: int, inputs: Mapping[str, Sequence[JobResult]],
             model: ModelRef | None = None, shard_index: int | None = None) -> Job:
    """The job of stage_name in iteration t for one shard (sharded stages) or all (the others), reading the
    given upstream results. A sharded stage's shard reads the same shard of its sharded inputs. Raises
    ValueError when an input or the model is missing or unexpected."""
    entry = stage(stage_name)
    given = {name: list(results) for name, results in inputs.items() if results}
    missing = [name for name in entry.required_inputs if name not in given]
    unexpected = [name for name in given if name not in entry.inputs]
    if missing or unexpected:
        raise ValueError(f"{stage_name}: inputs {sorted(given)} do not match the registry's {list(entry.inputs)} "
                         f"(missing {missing}, unexpected {unexpected})")
    if entry.uses_model and model is None:
        raise ValueError(f"{stage_name} runs the model of role {entry.model!r}: give it")
    if entry.sharded != (shard_index is not None):
        raise ValueError(f"{stage_name} is {'sharded: give a shard' if entry.sharded else 'not sharded'}")
    settings = settings_digest(entry.settings(config, iteration))
    code = code_fingerprint(stage_name)
    digests = {name: [result.table.digest for result in results] for name, results in sorted(given.items())}
    model_id = model.model_id if entry.uses_model else _input_model(stage_name, given)
    cache_key = _digest(json.dumps({
        "stage": stage_name, "iteration": iteration, "shard": shard_index, "settings": settings, "code": code,
        "inputs": digests, "model": model.model_id if entry.uses_model else None,
    }, sort_keys=True))
    shard = shard_label(shard_index)
    in_campaign = f"{config.name}/iter-{iteration}/{stage_name}/{shard}-{cache_key}"
    shared = entry in SEED_STAGES
    return Job(
        stage=stage_name, iteration=iteration, shard=shard, cache_key=cache_key,
        key=f"{SEED_FOLDER}/{stage_name}/{shard}-{cache_key}" if shared else in_campaign,
        campaign=config.name, former_key=in_campaign if shared else None, settings_digest=settings, code=code,
        # Copies: Prefect links a task's returned objects to it by identity, and an upstream result's table held
        # inside this job would draw an edge from every stage upstream of it.
        inputs={name: [dataclasses.replace(result.table) for result in results] for name, results in given.items()},
        model=model if entry.uses_model else None, model_id=model_id, shard_index=shard_index,
        shard_count=sharding(config, given) if entry.sharded else 1,
    )


def _input_model(stage_name: str, inputs: Mapping[str, list[JobResult]]) -> str | None:
    found = {result.model_id for results in inputs.values() for result in results if result.model_id}
    if len(found) > 1:
        raise ValueError(f"{stage_name}: inputs come from different models {sorted(found)}")
    return found.pop() if found else None


JobListener = Callable[[Job, JobResult], None]
_listeners: list[JobListener] = []


def add_job_listener(listener: JobListener) -> None:
    """Call listener(job, result) after every job this process runs or finds cached (progress bars)."""
    _listeners.append(listener)


def remove_job_listener(listener: JobListener) -> None:
    """Stop calling a listener added with add_job_listener."""
    _listeners.remove(listener)


class SettingsChangedError(RuntimeError):
    """The config a job runs with is not the one its key was computed from."""


def run_job(config: CampaignConfig, job: Job, store: ArtifactStore | None = None) -> JobResult:
    """The job's result: read from the store when its table and marker are there and agree (no model is
    loaded), otherwise computed by the stage's runner with the stage's settings, checked against the stage's
    schema, written atomically and marked complete. An input table that is not what its producer recorded
    raises CorruptArtifactError and loses its marker, so that the next run computes it again."""
    store = store or open_store(config.artifact_root)
    result, distrust = stored(store, job)
    if result is None:
        raise_if_stopped(job.run_name)
        inject_job_fault(job.stage, job.shard, job.run_name)
        entry = stage(job.stage)
        settings = entry.settings(config, job.iteration)
        if settings_digest(settings) != job.settings_digest:
            raise SettingsChangedError(f"{job.run_name}: the config's settings of this stage changed after the job "
                                       "was planned; run the iteration again")
        started = time.perf_counter()
        # Where the stage's model runs: the evaluator has an engine of its own.
        inference = config.evaluation.evaluator.inference if entry.model == "evaluator" else config.inference
        context = StageContext(job.stage, job.iteration, job.shard_index, job.model, job.model_id, job.inputs,
                               job.model_key, store, inference, config.orchestration, job.checkpoints_key)
        try:
            with progress.labelled(progress.stage_label(job.stage, job.iteration)):
                table, stats = entry.runner(context, **settings)
        except CorruptArtifactError as error:
            raise CorruptArtifactError(f"{job.run_name}: {error}; {_forget(store, job, str(error))}") from None
        # Everything the stage itself did (reading inputs, loading a model, calling it, building the table);
        # what a run takes beyond the sum of these is orchestration and artifact-store overhead.
        stats.counts["compute_seconds"] = time.perf_counter() - started
        result = complete(store, job, validate_table(table, entry.schema, job.stage), stats)
        result.recomputed = distrust
    if stage(job.stage).writes_model:
        # The kept model and the job's marker are in: its checkpoints go (also when a run died before removing them).
        CheckpointStore(store.root, result.job.checkpoints_key).clear()
    for listener in list(_listeners):
        listener(job, result)
    return result


def runs_on_replicas(config: CampaignConfig, job: Job) -> bool:
    """Whether the job runs on the engine replicas of a Ray cluster: a Ray address is set and the stage runs the
    campaign's engine (training, and the evaluator with its own engine settings, stay where the flow runs)."""
    entry = stage(job.stage)
    return (ray_address(config.orchestration) is not None and entry.uses_model and not entry.writes_model
            and entry.model != "evaluator")


def run_job_on_replicas(config: CampaignConfig, job: Job,
                        on_requeue: Callable[[str], None] | None = None) -> tuple[JobResult, Replica | None]:
    """run_job on the next free engine replica of the Ray cluster (placement.replicas.shared_pool), where the
    replica's engine stays loaded from one job to the next; returns the result and the replica that computed it
    (None for a finished job, read from the store here). A replica that dies mid-job is replaced and the job runs
    again on another (on_requeue says so). Keys, markers and tables are those run_job writes in this process."""
    if stored(open_store(config.artifact_root), job)[0] is not None:
        return run_job(config, job), None  # finished: read here, no replica (and no GPU) needed
    inference = config.inference
    pool = shared_pool(ray_address(config.orchestration), inference.replicas, inference.tensor_parallel_size,
                       config.orchestration.placement_timeout_s, name=f"{config.name}-iter-{job.iteration}")
    return pool.run(run_job, _one_replica(config), job, on_requeue=on_requeue)


def _one_replica(config: CampaignConfig) -> CampaignConfig:
    # Inside a replica the engine is one replica on the GPUs Ray gave it (its CUDA_VISIBLE_DEVICES).
    inference = config.inference.model_copy(update={"replicas": 1})
    return config.model_copy(update={"inference": inference})


def stored(store: ArtifactStore, job: Job) -> tuple[JobResult | None, str | None]:
    """The job's stored result and None when its marker and table are there and agree (ArtifactStore.mismatch:
    size, and the digest of a local table or the ETag of an S3 one) and, for a trained model, its folder's
    model_id.txt is there; else None and why a stored result is not trusted (None when there is none): a
    deleted, truncated or replaced artifact means the job runs again, never a silently missing or damaged one.
    A seed stage's job with nothing at its key is looked for at its former_key (the result's job then has that
    key); a campaign's job with nothing at its key, among the superseded tables (moved back: superseded.restore)."""
    result, distrust = _stored_at(store, job)
    if result is None and distrust is None and not job.key.startswith(SEED_FOLDER + "/") and restore(store, job.key):
        result, distrust = _stored_at(store, job)
    if result is None and distrust is None and job.former_key:
        former, _ = _stored_at(store, dataclasses.replace(job, key=job.former_key, former_key=None))
        if former is not None:
            return former, None
    return result, distrust


def _stored_at(store: ArtifactStore, job: Job) -> tuple[JobResult | None, str | None]:
    if not store.exists(job.marker_key):
        return None, None
    try:
        marker = store.read_json(job.marker_key)
        # Where the job's table is now (an artifact root that was moved still serves its tables).
        table = dataclasses.replace(TableRef.from_dict(marker["table"]), uri=store.uri(job.table_key))
    except (ValueError, KeyError, TypeError) as error:
        return None, f"its marker {store.uri(job.marker_key)} is damaged ({type(error).__name__})"
    problem = store.mismatch(table)
    if problem:
        return None, problem
    trained = stage(job.stage).writes_model and not marker["stats"].get("kept_previous_model")
    if trained and not store.exists(f"{job.model_key}/{MODEL_DIGEST_FILE}"):
        return None, f"its model folder {store.uri(job.model_key)} has no {MODEL_DIGEST_FILE}"
    return JobResult(job, table, marker["stats"], cached=True, computed_by=marker["job"].get("campaign")), None


def finished(store: ArtifactStore, job: Job) -> JobResult | None:
    """The job's stored result when it can be trusted (see stored), else None."""
    return stored(store, job)[0]


def _forget(store: ArtifactStore, job: Job, problem: str) -> str:
    """Remove the marker of the input table named in `problem`, so the job that wrote it runs again."""
    for tables in job.inputs.values():
        for table in tables:
            if table.uri in problem:
                store.delete(store.key_of(table.uri).removesuffix(".parquet") + ".json")
                return "its marker is removed: run the iteration again to compute it anew"
    return "delete it and run the iteration again"


def complete(store: ArtifactStore, job: Job, table: pl.DataFrame, stats: StageStats) -> JobResult:
    """Write the job's table, then its marker (last): the job counts as done only once both exist."""
    ref = store.write_table(job.table_key, table)
    marker = {"job": dataclasses.asdict(job), "table": ref.as_dict(), "stats": stats.as_dict(),
              "finished_at": dt.datetime.now(dt.UTC).isoformat()}
    store.write_json(job.marker_key, marker)
    return JobResult(job, ref, stats.as_dict())
