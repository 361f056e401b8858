"""Fan-out of a model stage's shards as flow runs of the `shard` deployment, and gathering their tables."""

from __future__ import annotations

import time

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
from prefect.client.schemas.objects import StateType
from prefect.deployments import run_deployment
from prefect.states import Cancelling

from metareward.artifacts.store import open_store
from metareward.config.campaign import CampaignConfig
from metareward.pipeline.context import ModelRef
from metareward.pipeline.jobs import JobResult, finished, plan_job


class ShardRunFailed(RuntimeError):
    """A shard's flow run ended in a state other than Completed (after its own task retries)."""


class ShardRunsTimedOut(ShardRunFailed):
    """Some shard flow runs were not final by orchestration.shard_timeout_s and were cancelled."""


def _timed_out(task, task_run, state) -> bool:
    """Retry the fan-out only after a deadline: a shard that failed had its own task retries already."""
    try:
        state.result()
    except ShardRunsTimedOut:
        return True
    except Exception:
        return False
    return True


_ADOPTABLE = {StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING}
"""States of an earlier shard flow run that a restarted iteration waits for instead of starting the shard again."""


@task(name="shard flow runs", task_run_name="{stage} iter-{iteration} on {config.orchestration.shard_deployment}",
      cache_policy=NO_CACHE, retries=1, retry_delay_seconds=10, retry_condition_fn=_timed_out)
def run_shards_on_workers(config: CampaignConfig, stage: str, iteration: int, model: ModelRef,
                          per_shard: list[dict[str, list[JobResult]]]) -> list[JobResult]:
    """Every unfinished shard of `stage` as a flow run of config.orchestration.shard_deployment (linked to this
    task run; one per shard, so each GPU worker serves one engine), all in flight at once; waits for them, at most
    orchestration.shard_timeout_s, and reads their results from the artifact store, the source of truth.

    Finished shards start no flow run. A shard's flow run is found again by its job's key (a tag): one still
    scheduled, pending or running — left by an iteration flow run that crashed, or by this task's previous
    attempt — is adopted and waited for, never started a second time; the idempotency key (the job's key and how
    many runs it already had) makes two iteration runs that start the same shard at once share one flow run. A
    shard flow run that is not final by the deadline is cancelled (its worker stops its pod) and the task fails,
    then, for a deadline only, retries once (the shard starts again). Raises ShardRunFailed naming each failed
    shard and its flow run."""
    store = open_store(config.artifact_root)
    deployment = config.orchestration.shard_deployment
    logger = get_run_logger()
    jobs = [plan_job(config, stage, iteration, inputs, model, index) for index, inputs in enumerate(per_shard)]
    results = {job.key: finished(store, job) for job in jobs}
    pending: dict = {}
    with get_client(sync_client=True) as client:
        for job, inputs in zip(jobs, per_shard, strict=True):
            if results[job.key] is not None:
                continue
            earlier = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                tags=FlowRunFilterTags(all_=[_key_tag(job.key)])))
            alive = [run for run in earlier if run.state is not None and run.state.type in _ADOPTABLE]
            if alive:
                flow_run = alive[0]
                logger.info("%s: adopting flow run %r (%s), still %s", job.run_name, flow_run.name, flow_run.id,
                            flow_run.state.name)
            else:
                flow_run = run_deployment(
                    deployment, timeout=0,
                    # Unset optional settings are left out: the deployment's schema has them as plain, omittable
                    # fields (metareward.config.sections.form_schema), which refuse an explicit null.
                    parameters={"config": config.model_dump(mode="json", exclude_none=True), "stage": stage,
                                "iteration": iteration, "shard": job.shard_index, "model": model, "upstream": inputs},
                    flow_run_name=f"{config.name} {job.run_name}", idempotency_key=f"{job.key}:{len(earlier)}",
                    tags=[config.name, stage, f"iter-{iteration}", _key_tag(job.key)],
                )
            pending[flow_run.id] = (job, flow_run.name)
        if pending:
            logger.info("%s: %d shard flow run(s) of %s in flight", stage, len(pending), deployment)
        failures, timed_out = _wait_for(client, pending, config.orchestration)
    if failures:
        raise (ShardRunsTimedOut if timed_out else ShardRunFailed)("; ".join(failures))
    for job in jobs:
        if results[job.key] is None:  # it ran as a flow run: its table is new, not cached
            results[job.key] = finished(store, job)
            if results[job.key] is not None:
                results[job.key].cached = False
    missing = [job.run_name for job in jobs if results[job.key] is None]
    if missing:
        raise ShardRunFailed(f"shard flow run(s) completed but their tables are not in the store: {missing}")
    return [results[job.key] for job in jobs]


def _key_tag(key: str) -> str:
    return f"key:{key}"


def _wait_for(client, pending: dict, orchestration) -> tuple[list[str], bool]:
    """Wait until every pending shard flow run is final or orchestration.shard_timeout_s has passed; cancel those
    still not final then. Returns one line per shard that did not complete, and whether the deadline passed."""
    failures = []
    deadline = time.monotonic() + orchestration.shard_timeout_s
    while pending:
        if time.monotonic() >= deadline:
            for flow_run_id, (job, name) in pending.items():
                client.set_flow_run_state(flow_run_id, Cancelling(
                    message=f"not finished within orchestration.shard_timeout_s={orchestration.shard_timeout_s:g} s"),
                    force=True)
                failures.append(f"{job.run_name}: flow run {name!r} ({flow_run_id}) did not finish within "
                                f"orchestration.shard_timeout_s={orchestration.shard_timeout_s:g} s (a worker or "
                                "node that never picked it up, or a hung pod); cancelled")
            return failures, True
        time.sleep(orchestration.shard_poll_interval_s)
        for flow_run_id, (job, name) in list(pending.items()):
            state = client.read_flow_run(flow_run_id).state
            if state is None or not state.is_final():
                continue
            del pending[flow_run_id]
            if not state.is_completed():
                failures.append(f"{job.run_name}: flow run {name!r} ({flow_run_id}) ended {state.type.value}: "
                                f"{state.message or 'no message'}")
    return failures, False
