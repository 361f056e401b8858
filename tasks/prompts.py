"""Prefect task: select the iteration's prompts (no model)."""

from prefect import task

from metareward.config import CampaignConfig
from metareward.execution import run_job
from metareward.pipeline import Job, JobResult
from tasks.common import stage_options


@task(name="prompts", **stage_options(gpu=False))
def select_prompts(config: CampaignConfig, job: Job) -> JobResult:
    """Write this iteration's prompt table (seeded, disjoint across iterations while the file lasts)."""
    return run_job(config, job)
