"""One Meta-Rewarding iteration as a Prefect flow, read top to bottom as the paper's Figure 1 (then, with an evaluation
section, the win rate of the model it trained); the seed flow, stage 0, that fine-tunes the base model into M_1;
and the shard flow model stages fan out to on a work pool (orchestration.shard_deployment)."""

from __future__ import annotations

from prefect import flow

from metareward.config.campaign import CampaignConfig
from metareward.inference.engines import close_shared_backends
from metareward.pipeline.context import ModelRef
from metareward.pipeline.health_gate import gated_data
from metareward.pipeline.jobs import JobResult
from tasks.audit import publish_audit
from tasks.common import in_this_environment, result_storage, retried
from tasks.health_gate import check_health, health_gate
from tasks.lease import campaign_lease
from tasks.stages import run_stage
from tasks.stopping import stop_work
from tasks.track import iteration_run


@flow(name="metareward-iteration", flow_run_name="{config.name} iter-{iteration}", persist_result=True,
      on_cancellation=[stop_work], on_crashed=[stop_work])
def iteration_flow(config: CampaignConfig, iteration: int, model_path: str) -> dict:
    """M_t (model_path) → tables → DPO → M_{t+1}. Every stage is a cached task: re-running the flow recomputes
    only what is missing or changed. Holds the campaign's lease, unless it runs inside the campaign flow that holds
    it. Returns the stage summaries and M_{t+1}'s URI and model_id.

    Args:
        config: The whole campaign (see the campaign flow).
        iteration: Which of config's iterations to run (1-based): its prompts and settings.
        model_path: M_t: a model folder, a checkpoint URI (e.g. the previous iteration's), a hub id, or
            builtin:smollm2-135m-instruct.
    """
    config = in_this_environment(config)
    with campaign_lease(config), iteration_run(config, iteration, model_path) as stages:
        prompts = stages.run("prompts")
        # Actor (sec. 2.1): K responses per prompt. Judge: N judgments per response; their mean is its reward.
        responses = stages.run("responses", prompts=prompts)
        judgments = stages.run("judgments", prompts=prompts, responses=responses)
        # Actor pairs: the shortest of the top tier vs the longest of the bottom tier (length control ρ).
        actor_pairs = stages.run("actor_pairs", prompts=prompts, responses=responses, judgments=judgments)
        # Meta-judge (sec. 2.2), in the iterations that train the judge: every pair of the highest-variance
        # response's judgments, both orders; their positional weights and Elo; best vs worst under the length filter.
        meta_judgments = stages.run("meta_judgments", prompts=prompts, responses=responses, judgments=judgments)
        elo = stages.run("judgment_elo", meta_judgments=meta_judgments, judgments=judgments)
        judge_pairs = stages.run("judge_pairs", prompts=prompts, responses=responses, judgments=judgments,
                                 judgment_elo=elo)
        # Health (sec. 3.5), before training on collapsed data (score saturation, position bias), with the judge's
        # audit beside it: stop, warn, or ask a person — continue, drop the judge pairs, keep M_t, or stop.
        audit = publish_audit(config, iteration, stages.models.policy, prompts=prompts, responses=responses,
                              judgments=judgments, meta_judgments=meta_judgments, judgment_elo=elo)
        checks = check_health(config, iteration, stages.finished, wait_for=(actor_pairs or []) + (judge_pairs or []))
        decision = stages.decide(health_gate(config, iteration, checks, gated_data(
            actor_pairs=actor_pairs, judge_pairs=judge_pairs), audit))
        dataset = stages.run("dpo_dataset", actor_pairs=actor_pairs,
                             judge_pairs=None if decision.drops_judge_pairs else judge_pairs, wait_for=[checks])
        # DPO (A.3): M_t → M_{t+1} (M_t itself when the decision is keep_model).
        checkpoint = stages.run("checkpoint", dpo_dataset=dataset)
        # With an evaluation section: M_{t+1}'s answers to held-out prompts against the reference's, by a fixed
        # evaluator.
        held_out = stages.run("eval_prompts")
        answers = stages.run("eval_answers", eval_prompts=held_out, wait_for=checkpoint)
        reference = stages.run("reference_answers", eval_prompts=held_out)
        stages.run("win_rate", eval_prompts=held_out, eval_answers=answers, reference_answers=reference)
    return stages.outcome()


@flow(name="metareward-seed", flow_run_name="{config.name} seed-sft", persist_result=True,
      on_cancellation=[stop_work], on_crashed=[stop_work])
def seed_flow(config: CampaignConfig) -> dict:
    """Stage 0 (paper sec. 3.1, "SFT on EFT"): the base model (model.path) fine-tuned on the judge examples of
    config.sft into M_1, cached like every stage. Holds the campaign's lease as the iteration flow does. Returns the
    stage summaries, and M_1's URI and model_id.

    Args:
        config: The campaign; its sft section names the judge examples and the training settings.
    """
    config = in_this_environment(config)
    with campaign_lease(config), iteration_run(config, 0, config.model.path) as stages:
        examples = stages.run("sft_data")
        stages.run("sft", sft_data=examples)
    return stages.outcome()


@flow(name="metareward-shard", flow_run_name="{config.name} {stage} iter-{iteration} shard-{shard:04d}",
      persist_result=True, on_cancellation=[stop_work], on_crashed=[stop_work])
def shard_flow(config: CampaignConfig, stage: str, iteration: int, shard: int, model: ModelRef,
               upstream: dict[str, list[JobResult]]) -> dict:
    """One shard of a model stage on a (GPU) worker: the same cached, retried task the iteration flow runs
    in-process, its table written to the artifact store; returns the shard's statistics. Started by iteration
    flows whose config sets orchestration.shard_deployment, not by hand; it runs under its iteration flow's lease
    and takes none.

    Args:
        config: The campaign.
        stage: responses, judgments or meta_judgments.
        iteration: The iteration the shard belongs to.
        shard: The shard's index.
        model: M_t (URI and content digest).
        upstream: The tables the shard reads, by stage (results of the stages before it).
    """
    resolved = in_this_environment(config)
    if resolved.artifact_root != config.artifact_root:
        raise ValueError(f"this worker's METAREWARD_ARTIFACT_ROOT ({resolved.artifact_root}) is not where the "
                         f"iteration flow that started this shard reads its tables ({config.artifact_root}): set the "
                         "same artifact root on both work pools")
    try:
        result = run_stage.with_options(name=stage, result_storage=result_storage(config), **retried(config))(
            config, stage, iteration, shard, model, upstream)
    finally:
        close_shared_backends()
    return result.stats
