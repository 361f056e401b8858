"""Prefect task: the meta-judge's verdicts on the judged responses, one shard."""

from prefect import task

from metareward.config import CampaignConfig
from metareward.execution import run_job
from metareward.pipeline import Job, JobResult
from tasks.common import stage_options


@task(name="meta_judgments", **stage_options(gpu=True))
def meta_judge(config: CampaignConfig, job: Job) -> JobResult:
    """Meta-judge (sec. 2.2, Fig. 2): both orders of every pair of valid judgments of each judged response."""
    return run_job(config, job)
