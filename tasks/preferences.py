"""Prefect tasks: Elo of judgments, actor and judge pairs, the DPO dataset (whole iteration, no model)."""

from prefect import task

from metareward.config import CampaignConfig
from metareward.execution import run_job
from metareward.pipeline import Job, JobResult
from tasks.common import stage_options


@task(name="judgment_elo", **stage_options(gpu=False))
def rank_judgments(config: CampaignConfig, job: Job) -> JobResult:
    """Positional weights over the whole iteration, battle matrices, batched Elo (sec. 2.2)."""
    return run_job(config, job)


@task(name="actor_pairs", **stage_options(gpu=False))
def select_actor_pairs(config: CampaignConfig, job: Job) -> JobResult:
    """Length-controlled actor pairs (ρ, chosen-length filter; sec. 2.1)."""
    return run_job(config, job)


@task(name="judge_pairs", **stage_options(gpu=False))
def select_judge_pairs(config: CampaignConfig, job: Job) -> JobResult:
    """Highest vs lowest Elo judgment per judged response (judge-length filter; sec. 2.2)."""
    return run_job(config, job)


@task(name="dpo_dataset", **stage_options(gpu=False))
def build_dpo_dataset(config: CampaignConfig, job: Job) -> JobResult:
    """Actor pairs plus, when the schedule says so, judge pairs."""
    return run_job(config, job)
