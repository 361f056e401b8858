"""The one Prefect task every stage job runs as — cached by its artifact key, retried, named like
`judgments iter-2 shard-0007`, its upstream stages' results as its inputs so that Prefect's graph of an
iteration draws the paper's Figure 1 — and the helper that runs a whole stage (its shards in this process or
as flow runs on a work pool) and writes its manifest."""

from __future__ import annotations

import uuid
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE, CachePolicy
from prefect.context import TaskRunContext
from prefect.futures import wait
from prefect.settings import get_current_settings

from metareward.artifacts.stats import combine
from metareward.artifacts.store import open_store
from metareward.config.campaign import CampaignConfig
from metareward.pipeline.context import ModelRef
from metareward.pipeline.health_gate import Decision
from metareward.pipeline.jobs import (
    JobResult,
    finished,
    plan_job,
    run_job,
    run_job_on_replicas,
    run_name,
    runs_on_replicas,
    shard_inputs,
    sharding,
)
from metareward.pipeline.manifests import lists, manifest_key, write_manifest
from metareward.pipeline.model_roles import IterationModels
from metareward.pipeline.stages import stage, why_not_run
from metareward.pipeline.summary import iteration_title, job_line, summary_markdown
from metareward.pipeline.superseded import superseded_key
from metareward.placement.replicas import close_shared_pools, ray_address
from tasks.common import GPU_TAG, RETRIED, iteration_artifact_key, progress_artifact_key, result_storage, retried
from tasks.lease import check_lease
from tasks.progress import StageProgressArtifact
from tasks.shards import run_shards_on_workers

Upstream = dict[str, list[JobResult]]


@dataclass
class ArtifactCache(CachePolicy):
    """Cache key = the job's key (input digests, model digest, the stage's settings and code fingerprint), so
    a finished job shows as Cached in Prefect and is never recomputed. If the job's artifacts were deleted while
    Prefect still holds a result for the key (or, for a stage that is not sharded, its manifest is gone or lists the
    job of other settings), the key is replaced by a one-off key: the task runs again — reading its table from the
    store when it is there, and writing the stage's manifest — instead of returning a reference to a table that is
    gone or leaving the manifest of other settings in place."""

    def compute_key(self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any],
                    **kwargs: Any) -> str | None:
        config: CampaignConfig = inputs["config"]
        job = plan_job(config, inputs["stage"], inputs["iteration"], inputs["upstream"], inputs["model"],
                       inputs["shard"])
        key = f"{config.name}-{job.stage}-{job.iteration}-{job.shard}-{job.cache_key}"
        store = open_store(config.artifact_root)
        result = finished(store, job)
        missing = result is None or (not stage(job.stage).sharded and not lists(store, config.name, job))
        recorded = task_ctx.result_store is not None and task_ctx.result_store.exists(key)
        if missing and recorded:
            return f"{key}-rerun-{uuid.uuid4().hex}"
        if recorded:  # Prefect returns the cached result without running the task: its log line is written here
            get_run_logger().info(job_line(result))
        return key


def _task_run_name(parameters: dict[str, Any]) -> str:
    return run_name(parameters["stage"], parameters["iteration"], parameters["shard"])


@task(name="stage", task_run_name=_task_run_name, cache_policy=ArtifactCache(), persist_result=True, **RETRIED)
def run_stage(config: CampaignConfig, stage: str, iteration: int, shard: int | None, model: ModelRef | None,
              upstream: Upstream) -> JobResult:
    """One job of a stage: its table from the store when finished, else computed and stored. A stage that is
    not sharded has one job, which also writes the stage's manifest."""
    job = plan_job(config, stage, iteration, upstream, model, shard)
    check_lease(config)  # a run that lost the campaign's lease to another starts no job
    logger = get_run_logger()
    replica = None
    if runs_on_replicas(config, job):
        result, replica = run_job_on_replicas(config, job, on_requeue=lambda why: logger.warning(
            "%s re-queued: %s", job.run_name, why))
    else:
        result = run_job(config, job)
    (logger.warning if result.recomputed else logger.info)(job_line(result) + (f"; ran on {replica}" if replica
                                                                                 else ""))
    if shard is None:
        _log_superseded(write_manifest(open_store(config.artifact_root), config.name, [job], [result]))
    return result


def _log_superseded(moved: list[str]) -> None:
    """Say which tables of other settings left the stage's folder, and where they wait for `metareward gc`."""
    if moved:
        get_run_logger().info("%d superseded file(s) moved out of the stage's folder (to %s/…, until `metareward gc` "
                              "removes them): %s", len(moved), superseded_key(moved[0]).rsplit("/", 1)[0],
                              ", ".join(key.rsplit("/", 1)[1] for key in moved))


@task(name="manifest", task_run_name="{stage} iter-{iteration} manifest", cache_policy=NO_CACHE, **RETRIED)
def write_stage_manifest(config: CampaignConfig, stage: str, iteration: int, shards: list[JobResult]) -> None:
    """The manifest of a sharded stage, from its shards' results; logs what it lists and where it is."""
    # Returns nothing: Prefect links a task's returned values (and their parts) to it by identity, and the
    # stage's statistics share strings with other tasks' inputs, which would draw edges that are not there.
    store = open_store(config.artifact_root)
    _log_superseded(write_manifest(store, config.name, [r.job for r in shards], shards))
    cached = sum(result.cached for result in shards)
    get_run_logger().info("%s iter-%d: manifest of %d shard(s) (%d computed now, %d found in the store), %d rows: %s",
                          stage, iteration, len(shards), len(shards) - cached, cached,
                          sum(result.table.rows for result in shards),
                          store.uri(manifest_key(config.name, iteration, stage)))


class IterationStages:
    """Runs the stages of one iteration flow run as Prefect tasks — those the registry says run in this iteration
    (stages.why_not_run), each on the model of its role (model_roles.IterationModels) — and remembers what each
    finished with."""

    def __init__(self, config: CampaignConfig, iteration: int, model: ModelRef):
        self.config = config
        self.iteration = iteration
        self.models = IterationModels(config, iteration, model)
        self.mlflow_link: str | None = None
        """Where the iteration's MLflow run is seen (None with tracking off), once its run is open."""
        self.finished: dict[str, dict] = {}
        """Combined statistics of each stage this flow run finished, in the order they ran."""
        self.decision: Decision | None = None
        """What the iteration does after its health checks (see decide), once they ran."""
        self._storage = result_storage(config)

    def run(self, name: str, wait_for: list | None = None,
            **upstream: list[JobResult] | None) -> list[JobResult] | None:
        """Run stage `name` on the given upstream results (None for a stage that did not run): one task, or one per
        shard (in this process one after another; with a Ray address all at once, each task run handing its job to
        a free engine replica; or as flow runs of orchestration.shard_deployment); returns its results in shard
        order. A training stage first releases the engine replicas' GPUs. Returns None, and logs why, when the
        registry says the stage does not run in this iteration. Raises LeaseLostError when this run lost the
        campaign's lease."""
        entry = stage(name)
        reason = why_not_run(self.config, name, self.iteration)
        if not reason and entry.writes_model and self.decision is not None and self.decision.keeps_model:
            reason = f"the health decision is keep_model ({self.decision.decided_by}): M_{{t+1}} = M_t"
            self.models.trained = self.models.policy
        if reason:
            get_run_logger().info("%s not run: %s", name, reason)
            return None
        check_lease(self.config)
        model = self.models.of(entry.model)
        if entry.writes_model:
            close_shared_pools()  # training gets the GPUs the engine replicas held
        given = {input_name: results for input_name, results in upstream.items() if results is not None}
        shards = sharding(self.config, given) if entry.sharded else 1
        self._show_running(name, shards)
        with StageProgressArtifact(progress_artifact_key(self.config.name, self.iteration, name), name,
                                   self.iteration, shards) if entry.uses_model else nullcontext():
            results = self._run_jobs(name, model, given, shards, wait_for)
        self.finished[name] = combine(name, [result.stats for result in results])
        if entry.writes_model:
            self._announce(self.models.trained_by(results[0].stats))
        return results

    def _announce(self, trained: ModelRef) -> None:
        """Say which model the iteration trained, where it is and under which name MLflow will show it."""
        number = self.iteration + 1
        tracking = self.config.tracking
        mlflow = (f"; MLflow: logged model {self.config.name}-M{number}, registered as "
                  f"{tracking.registered_model or self.config.name!r} version {number}, when the iteration is logged"
                  if tracking.enabled else "")
        get_run_logger().info("M_%d (digest %s) is at %s%s", number, trained.model_id, trained.uri, mlflow)

    def _run_jobs(self, name: str, model: ModelRef | None, given: Upstream, shards: int,
                  wait_for: list | None) -> list[JobResult]:
        """The stage's task runs, as run() says, and its manifest (a sharded stage's, once every shard is done)."""
        entry = stage(name)
        options = {"name": name, "result_storage": self._storage, **retried(self.config)}
        if not entry.sharded:
            return [run_stage.with_options(**options, tags=self._tags(name, given, model, None))(
                self.config, name, self.iteration, None, model, given, wait_for=wait_for)]
        per_shard = [shard_inputs(given, index) for index in range(shards)]
        if self.config.orchestration.shard_deployment:
            results = run_shards_on_workers(self.config, name, self.iteration, model, per_shard)
        elif ray_address(self.config.orchestration) and entry.uses_model:
            # Every shard in flight at once: each task run waits for a free engine replica (work stealing).
            futures = [run_stage.with_options(**options, tags=self._tags(name, inputs, model, index)).submit(
                self.config, name, self.iteration, index, model, inputs, wait_for=wait_for)
                for index, inputs in enumerate(per_shard)]
            wait(futures)  # every shard ends (or fails) before the first failure is raised: none left running
            results = [future.result() for future in futures]
        else:
            results = [run_stage.with_options(**options, tags=self._tags(name, inputs, model, index))(
                self.config, name, self.iteration, index, model, inputs, wait_for=wait_for)
                for index, inputs in enumerate(per_shard)]
        write_stage_manifest(self.config, name, self.iteration, results)
        return results

    def _show_running(self, name: str, shards: int) -> None:
        """The iteration's summary artifact with the stages finished so far and the one starting now."""
        create_markdown_artifact(
            key=iteration_artifact_key(self.config.name, self.iteration),
            markdown=summary_markdown(self.config.name, self.iteration, self.models.policy.model_id, self.finished,
                                      self.mlflow_link, self.decision_summary())
            + f"\n**Running now: {name}** ({shards} shard(s))"
            + (f"; its progress: the `{progress_artifact_key(self.config.name, self.iteration, name)}` artifact"
               if stage(name).uses_model else "") + "\n",
            description=f"{self.config.name}: {iteration_title(self.iteration)} (running {name})")

    def decide(self, decision: Decision) -> Decision:
        """Take the iteration's health decision (tasks/health_gate.py): with keep_model its training stage does not
        run and M_{t+1} is M_t. Returns it."""
        self.decision = decision
        return decision

    def _tags(self, name: str, inputs: Upstream, model: ModelRef | None, shard: int | None) -> list[str]:
        """The job's tags on a Prefect server: the `gpu` tag of model stages (for concurrency limits) and its
        artifact key, so that the task run that wrote a table is found by its key (Prefect 3 shows no cache key
        of its own). None on the embedded ephemeral API (no PREFECT_API_URL), where no UI or concurrency limit
        reads them and each tagged task's concurrency check waits ~2 s on SQLite's lock
        (PrefectHQ/prefect#18934)."""
        if get_current_settings().api.url is None:
            return []
        job = plan_job(self.config, name, self.iteration, inputs, model, shard)
        return ([GPU_TAG] if stage(name).uses_model else []) + [f"key:{job.cache_key}"]

    def outcome(self) -> dict:
        """What the iteration flow returns: the stage summaries, and M_{t+1}'s URI and model_id."""
        trained = self.models.of("trained")
        return {"iteration": self.iteration, "model_id": self.models.policy.model_id, "stages": self.finished,
                "next_model": trained.uri, "next_model_id": trained.model_id, "mlflow": self.mlflow_link,
                "health_decision": self.decision_summary()}

    def decision_summary(self) -> dict | None:
        """The health decision's choice, who took it and the note (None before the checks ran)."""
        return self.decision.brief() if self.decision else None
