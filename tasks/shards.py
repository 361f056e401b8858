"""Fan-out of a model stage's shards as flow runs of the `shard` deployment, and gathering their tables."""

from __future__ import annotations

import time

from prefect import get_run_logger
from prefect.client.orchestration import get_client
from prefect.context import get_run_context
from prefect.deployments import run_deployment

from metareward.config import CampaignConfig
from metareward.pipeline import Job, JobResult, finished
from metareward.store import ArtifactStore


class ShardRunFailed(RuntimeError):
    """A shard's flow run ended in a state other than Completed (after its own task retries)."""


def run_shards_as_flow_runs(config: CampaignConfig, jobs: list[Job]) -> list[JobResult]:
    """Every unfinished job as a flow run of config.orchestration.shard_deployment (a child of this flow
    run; one per shard, so each GPU worker serves one engine), all in flight at once; waits for them and
    reads their results from the artifact store, the source of truth. Finished jobs start no flow run.
    A retried (UI: Retry) or re-run iteration flow starts flow runs only for jobs still missing from the
    store; the idempotency key (this flow run, its attempt, the job's key) keeps one attempt from starting
    a shard twice. Raises ShardRunFailed naming the shard and its flow run."""
    store = ArtifactStore(config.artifact_root)
    parent = get_run_context().flow_run
    attempt = f"{parent.id}:{parent.run_count}"
    results = {job.key: finished(store, job) for job in jobs}
    pending: dict = {}
    for job in jobs:
        if results[job.key] is None:
            flow_run = run_deployment(
                config.orchestration.shard_deployment, parameters={"config": config, "job": job}, timeout=0,
                flow_run_name=f"{config.name} {job.run_name}", idempotency_key=f"{attempt}:{job.key}",
                tags=[config.name, job.stage, f"iter-{job.iteration}"],
            )
            pending[flow_run.id] = (job, flow_run.name)
    if pending:
        get_run_logger().info("%s: %d shard flow run(s) of %s in flight", jobs[0].stage, len(pending),
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
