"""One Meta-Rewarding iteration as a Prefect flow, in the order of the paper's Figure 1."""

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
from tasks.train import train


@flow(name="metareward-iteration", flow_run_name="{config.name} iter-{iteration}", persist_result=True)
def iteration_flow(config: CampaignConfig, iteration: int, model_path: str) -> dict:
    """M_t (model_path) → tables → DPO → M_{t+1}. Returns the stage summaries and M_{t+1}'s URI and model_id.

    Every stage is a cached task: re-running the flow recomputes only what is missing or changed.
    """
    plan = IterationPlan(config, iteration, model_path, model_digest(resolve_model(model_path)))
    store = ArtifactStore(config.artifact_root)
    storage = result_storage(config)
    stages: dict[str, dict] = {}

    def run(task, jobs: list[Job]) -> list[JobResult]:
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
