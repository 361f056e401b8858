"""Prefect task: DPO of M_t into M_{t+1}; the checkpoint is uploaded complete before the task succeeds."""

from prefect import task

from metareward.config import CampaignConfig
from metareward.execution import run_job
from metareward.pipeline import Job, JobResult
from tasks.common import stage_options


@task(name="checkpoint", **stage_options(gpu=True))
def train(config: CampaignConfig, job: Job) -> JobResult:
    """TRL DPO on the iteration's dataset; returns the training log table and M_{t+1}'s URI and model_id."""
    return run_job(config, job)
