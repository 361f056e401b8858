"""Fan-out of a model stage's shards as flow runs of the `shard` deployment, and gathering their tables."""

from __future__ import annotations

import time

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.context import TaskRunContext
from prefect.deployments import run_deployment

from metareward.artifacts.store import open_store
from metareward.config.campaign import CampaignConfig
from metareward.pipeline.context import ModelRef
from metareward.pipeline.jobs import JobResult, finished, plan_job


class ShardRunFailed(RuntimeError):
    """A shard's flow run ended in a state other than Completed (after its own task retries)."""


@task(name="shard flow runs", task_run_name="{stage} iter-{iteration} on {config.orchestration.shard_deployment}",
      cache_policy=NO_CACHE)
def run_shards_on_workers(config: CampaignConfig, stage: str, iteration: int, model: ModelRef,
                          per_shard: list[dict[str, list[JobResult]]]) -> list[JobResult]:
    """Every unfinished shard of `stage` as a flow run of config.orchestration.shard_deployment (linked to this
    task run; one per shard, so each GPU worker serves one engine), all in flight at once; waits for them and
    reads their results from the artifact store, the source of truth. Finished shards start no flow run. A
    retried or re-run iteration starts flow runs only for shards still missing from the store; the idempotency
    key (this task run, its attempt, the job's key) keeps one attempt from starting a shard twice. Raises
    ShardRunFailed naming the shard and its flow run."""
    store = open_store(config.artifact_root)
    current = TaskRunContext.get().task_run
    attempt = f"{current.id}:{current.run_count}"
    jobs = [plan_job(config, stage, iteration, inputs, model, index) for index, inputs in enumerate(per_shard)]
    results = {job.key: finished(store, job) for job in jobs}
    pending: dict = {}
    for job, inputs in zip(jobs, per_shard, strict=True):
        if results[job.key] is None:
            flow_run = run_deployment(
                config.orchestration.shard_deployment, timeout=0,
                # Unset optional settings are left out: the deployment's schema has them as plain, omittable
                # fields (metareward.config.sections.form_schema), which refuse an explicit null.
                parameters={"config": config.model_dump(mode="json", exclude_none=True), "stage": stage,
                            "iteration": iteration, "shard": job.shard_index, "model": model, "upstream": inputs},
                flow_run_name=f"{config.name} {job.run_name}", idempotency_key=f"{attempt}:{job.key}",
                tags=[config.name, stage, f"iter-{iteration}"],
            )
            pending[flow_run.id] = (job, flow_run.name)
    if pending:
        get_run_logger().info("%s: %d shard flow run(s) of %s in flight", stage, len(pending),
                              config.orchestration.shard_deployment)
    failures = []
    with get_client(sync_client=True) as client:
        while pending:
            time.sleep(config.orchestration.shard_poll_interval_s)
            for flow_run_id, (job, name) in list(pending.items()):
                state = client.read_flow_run(flow_run_id).state
                if state is None or not state.is_final():
                    continue
                del pending[flow_run_id]
                if not state.is_completed():
                    failures.append(f"{job.run_name}: flow run {name!r} ({flow_run_id}) ended {state.type.value}: "
                                    f"{state.message or 'no message'}")
    if failures:
        raise ShardRunFailed("; ".join(failures))
    for job in jobs:
        if results[job.key] is None:  # it ran as a flow run: its table is new, not cached
            results[job.key] = finished(store, job)
            if results[job.key] is not None:
                results[job.key].cached = False
    missing = [job.run_name for job in jobs if results[job.key] is None]
    if missing:
        raise ShardRunFailed(f"shard flow run(s) completed but their tables are not in the store: {missing}")
    return [results[job.key] for job in jobs]
