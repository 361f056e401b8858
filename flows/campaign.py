"""A Meta-Rewarding campaign as a Prefect flow: one iteration flow per configured iteration, M_t → M_{t+1}."""

from __future__ import annotations

from prefect import flow

from flows.iteration import iteration_flow
from metareward.config import CampaignConfig


@flow(name="metareward-campaign", flow_run_name="{config.name}", persist_result=True)
def campaign_flow(config: CampaignConfig, start_iteration: int = 1, start_model: str | None = None) -> list[dict]:
    """Run iterations start_iteration..end; iteration t+1 generates with the M_{t+1} that iteration t
    trained. start_model (a checkpoint URI) resumes a campaign from any iteration's checkpoint; by default
    iteration 1 starts from config.model.path. Re-running resumes: finished stages come from the store."""
    if not 1 <= start_iteration <= len(config.iterations):
        raise ValueError(f"start_iteration must be in 1..{len(config.iterations)}, got {start_iteration}")
    model = start_model or config.model.path
    outcomes = []
    for iteration in range(start_iteration, len(config.iterations) + 1):
        outcome = iteration_flow(config, iteration, model)
        outcomes.append(outcome)
        model = outcome["next_model"]
    return outcomes
