"""One Meta-Rewarding iteration as a Prefect flow in the order of the paper's Figure 1, and the shard flow its
model stages fan out to on a work pool (orchestration.shard_deployment)."""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from metareward.config import CampaignConfig
from metareward.evaluation import HealthCheckError, health_problems
from metareward.inference import close_shared_backends
from metareward.models import model_digest, resolve_model
from metareward.pipeline import IterationPlan, Job, JobResult, file_digest, write_manifest
from metareward.stats import summary_markdown
from metareward.store import ArtifactStore
from tasks.common import result_storage
from tasks.generate import generate_responses
from tasks.judge import judge_responses
from tasks.meta_judge import meta_judge
from tasks.preferences import build_dpo_dataset, rank_judgments, select_actor_pairs, select_judge_pairs
from tasks.prompts import select_prompts
from tasks.shards import run_shards_as_flow_runs
from tasks.track import start_tracking, track_iteration
from tasks.train import train


SHARD_TASKS = {"responses": generate_responses, "judgments": judge_responses, "meta_judgments": meta_judge}
"""The model stages whose shards can run as flow runs of the shard deployment (orchestration.shard_deployment)."""


@flow(name="metareward-shard", flow_run_name="{config.name} {job.stage} iter-{job.iteration} {job.shard}",
      persist_result=True)
def shard_flow(config: CampaignConfig, job: Job) -> dict:
    """One shard of a model stage on a (GPU) worker: the same cached, retried task the iteration flow runs
    in-process, its table written to the artifact store; returns the shard's statistics."""
    if job.stage not in SHARD_TASKS:
        raise ValueError(f"shard_flow runs {sorted(SHARD_TASKS)} shards, not {job.stage!r}")
    try:
        result = SHARD_TASKS[job.stage].with_options(result_storage=result_storage(config))(config, job)
    finally:
        close_shared_backends()
    return result.stats


@flow(name="metareward-iteration", flow_run_name="{config.name} iter-{iteration}", persist_result=True)
def iteration_flow(config: CampaignConfig, iteration: int, model_path: str) -> dict:
    """M_t (model_path) → tables → DPO → M_{t+1}. Returns the stage summaries and M_{t+1}'s URI and model_id.

    Every stage is a cached task: re-running the flow recomputes only what is missing or changed. With
    tracking on, the iteration is logged to its MLflow run when it ends, also when it fails (as FAILED).
    """
    plan = IterationPlan(config, iteration, model_path, model_digest(resolve_model(model_path)))
    runs = start_tracking(config, iteration, plan.model_id, model_path)
    stages: dict[str, dict] = {}
    try:
        outcome = _run_stages(config, plan, stages)
    except Exception as error:
        if runs:
            try:
                track_iteration(config, iteration, runs, list(stages), error=f"{type(error).__name__}: {error}")
            except Exception as tracking_error:  # the stage's error is the one to report
                get_run_logger().warning("MLflow logging of the failed iteration failed too: %s", tracking_error)
        raise
    if runs:
        track_iteration(config, iteration, runs, list(stages))
    return outcome


def _run_stages(config: CampaignConfig, plan: IterationPlan, stages: dict[str, dict]) -> dict:
    """The stages in Figure 1's order; `stages` receives each stage's combined statistics as it finishes."""
    iteration = plan.iteration
    store = ArtifactStore(config.artifact_root)
    storage = result_storage(config)

    def run(task, jobs: list[Job]) -> list[JobResult]:
        if config.orchestration.shard_deployment and task in SHARD_TASKS.values():
            results = run_shards_as_flow_runs(config, jobs)
        else:
            results = [task.with_options(result_storage=storage)(config, job) for job in jobs]
        stages[jobs[0].stage] = write_manifest(store, config, jobs, results)
        return results

    [prompts] = [r.table for r in run(select_prompts, [plan.prompts_job(file_digest(config.prompts.path))])]
    shards = plan.shards(prompts)

    # Actor: K responses per prompt. Judge: N judgments per response, their mean the reward (sec. 2.1).
    responses = [r.table for r in run(generate_responses, [plan.responses_job(s, prompts) for s in shards])]
    judgments = [r.table for r in run(judge_responses,
                                      [plan.judgments_job(s, prompts, responses[s]) for s in shards])]
    [actor_pairs] = [r.table for r in run(select_actor_pairs, [plan.actor_pairs_job(prompts, responses, judgments)])]

    # Meta-judge: the highest-variance response's judgments, pairwise in both orders → Elo → pairs (sec. 2.2).
    judge_pairs = None
    if plan.settings.train_judge:
        meta = [r.table for r in run(meta_judge, [plan.meta_judgments_job(s, prompts, responses[s], judgments[s])
                                                  for s in shards])]
        [elo] = [r.table for r in run(rank_judgments, [plan.judgment_elo_job(meta, judgments)])]
        [judge_pairs] = [r.table for r in run(select_judge_pairs,
                                              [plan.judge_pairs_job(prompts, responses, judgments, elo)])]

    # Health: stop (or warn) before training on collapsed data (paper sec. 3.5: saturation, position bias).
    [dataset] = [r.table for r in run(build_dpo_dataset, [plan.dpo_dataset_job(actor_pairs, judge_pairs)])]
    problems = health_problems(config.health, stages)
    if problems and config.health.action == "stop":
        raise HealthCheckError(f"iteration {iteration} failed its health checks, not training: " + "; ".join(problems))
    for problem in problems:
        get_run_logger().warning("health check: %s", problem)

    # DPO: M_t → M_{t+1}, after the inference engine has let go of the accelerator.
    close_shared_backends()
    [checkpoint] = run(train, [plan.checkpoint_job(dataset)])

    create_markdown_artifact(
        key=f"{config.name}-iter-{iteration}".lower().replace("_", "-").replace(".", "-"),
        markdown=summary_markdown(config.name, iteration, plan.model_id, stages),
        description=f"{config.name}: iteration {iteration} stage summary",
    )
    return {"iteration": iteration, "model_id": plan.model_id, "stages": stages,
            "next_model": checkpoint.stats["model_uri"], "next_model_id": checkpoint.stats["model_id"]}
