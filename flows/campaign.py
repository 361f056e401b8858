"""A Meta-Rewarding campaign as a Prefect flow: one iteration flow per configured iteration, M_t → M_{t+1}."""

from __future__ import annotations

from typing import Annotated

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from pydantic import Field

from flows.iteration import iteration_flow, seed_flow
from metareward.artifacts.store import open_store
from metareward.config.campaign import CampaignConfig
from metareward.pipeline.model_roles import starting_model
from metareward.pipeline.paper_tables import paper_tables
from metareward.pipeline.summary import campaign_markdown
from metareward.preflight import check_start_iteration
from tasks.common import artifact_key, in_this_environment
from tasks.lease import campaign_lease
from tasks.stopping import stop_work


@flow(name="metareward-campaign", flow_run_name="{config.name}", persist_result=True,
      on_cancellation=[stop_work], on_crashed=[stop_work])
def campaign_flow(config: CampaignConfig, start_iteration: Annotated[int, Field(ge=1)] = 1,
                  start_model: str = "") -> list[dict]:
    """Run the seed's SFT (when config has an sft section and the campaign starts at iteration 1), then
    iterations start_iteration..end; iteration t+1 generates with the M_{t+1} that iteration t trained.
    Re-running resumes: finished stages come from the store. Holds the campaign's lease while it runs: another run of
    the campaign on the same artifact root stops before its first stage with CampaignHeldError naming this one.
    Ends by logging the paper's tables (Table 1, Table 5, Fig. 5) from the campaign's stages, also as the campaign's
    `paper-tables` artifact.

    Args:
        config: The whole campaign (`metareward config show FILE` prints one with every default): the seed model,
            the prompt file, the engine, where artifacts and MLflow runs go, and each iteration's settings.
        start_iteration: The first iteration to run (1 = from the seed model).
        start_model: The model the first iteration runs (a model folder or a checkpoint URI such as
            s3://…/iter-1/checkpoint/all-…/model). Empty: M_1 for iteration 1 (config.model.path, or the seed
            SFT's model when config has an sft section, trained first), the previous iteration's checkpoint in
            the artifact store for a later one.
    """
    config = in_this_environment(config)
    check_start_iteration(config, start_iteration)
    # One run at a time writes the campaign's tables: another run of it stops here, naming the run that holds it.
    with campaign_lease(config):
        outcomes = []
        if not start_model and config.sft and start_iteration == 1:
            # Stage 0: the base model fine-tuned on judge data is M_1.
            outcomes.append(seed_flow(config))
            model = outcomes[0]["next_model"]
        else:
            model = start_model or starting_model(config, start_iteration)
        for iteration in range(start_iteration, len(config.iterations) + 1):
            outcome = iteration_flow(config, iteration, model)
            outcomes.append(outcome)
            model = outcome["next_model"]
            registered = (config.tracking.registered_model or config.name) if config.tracking.enabled else None
            create_markdown_artifact(key=artifact_key(config.name, "campaign"),
                                     markdown=campaign_markdown(config.name, outcomes, registered),
                                     description=f"{config.name}: its iterations so far, with their MLflow runs")
    tables = paper_tables(open_store(config.artifact_root), config.name)
    get_run_logger().info("The paper's tables from this campaign:\n%s", tables)
    create_markdown_artifact(key=artifact_key(config.name, "paper-tables"), markdown=tables,
                             description=f"{config.name}: the paper's Table 1, Table 5 and Fig. 5 from its stages")
    return outcomes
