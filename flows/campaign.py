"""A Meta-Rewarding campaign as a Prefect flow: one iteration flow per configured iteration, M_t → M_{t+1}."""

from __future__ import annotations

from prefect import flow

from flows.iteration import iteration_flow
from metareward.config import CampaignConfig
from metareward.preflight import check_start_iteration, starting_model


@flow(name="metareward-campaign", flow_run_name="{config.name}", persist_result=True)
def campaign_flow(config: CampaignConfig, start_iteration: int = 1, start_model: str | None = None) -> list[dict]:
    """Run iterations start_iteration..end; iteration t+1 generates with the M_{t+1} that iteration t
    trained. start_model (a model folder or checkpoint URI) starts iteration start_iteration from it; without
    one, iteration 1 starts from config.model.path and a later one from the previous iteration's checkpoint in
    the artifact store (an error says how to pass it when there is none). Re-running resumes: finished stages
    come from the store."""
    check_start_iteration(config, start_iteration)
    model = start_model or starting_model(config, start_iteration)
    outcomes = []
    for iteration in range(start_iteration, len(config.iterations) + 1):
        outcome = iteration_flow(config, iteration, model)
        outcomes.append(outcome)
        model = outcome["next_model"]
    return outcomes
