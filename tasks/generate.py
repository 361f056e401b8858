"""Prefect task: the actor's K responses per prompt, one shard."""

from prefect import task

from metareward.config import CampaignConfig
from metareward.execution import run_job
from metareward.pipeline import Job, JobResult
from tasks.common import stage_options


@task(name="responses", **stage_options(gpu=True))
def generate_responses(config: CampaignConfig, job: Job) -> JobResult:
    """Actor (sec. 2.1) on one shard; the engine is shared with the process's other shards and roles."""
    return run_job(config, job)
