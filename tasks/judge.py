"""Prefect task: the judge's N judgments per response, one shard."""

from prefect import task

from metareward.config import CampaignConfig
from metareward.execution import run_job
from metareward.pipeline import Job, JobResult
from tasks.common import stage_options


@task(name="judgments", **stage_options(gpu=True))
def judge_responses(config: CampaignConfig, job: Job) -> JobResult:
    """Judge (sec. 2.1, A.1) on one shard; the engine is shared with the process's other shards and roles."""
    return run_job(config, job)
