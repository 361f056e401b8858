"""Prefect tasks: open an iteration's MLflow runs, then log it from the artifact store and close them."""

from prefect import task
from prefect.cache_policies import NO_CACHE

from metareward import tracking
from metareward.config import CampaignConfig
from tasks.common import RETRIES, RETRY_DELAYS


@task(name="start-tracking", retries=RETRIES, retry_delay_seconds=RETRY_DELAYS, cache_policy=NO_CACHE)
def start_tracking(config: CampaignConfig, iteration: int, model_digest: str, model_uri: str) -> dict | None:
    """The campaign run and iteration t's run ids in MLflow (reopened on a re-run); None with tracking off."""
    return tracking.start_iteration(config, iteration, model_digest, model_uri)


@task(name="track-iteration", retries=RETRIES, retry_delay_seconds=RETRY_DELAYS, cache_policy=NO_CACHE)
def track_iteration(config: CampaignConfig, iteration: int, runs: dict, stages: list[str],
                    error: str | None = None) -> None:
    """Log the stages this flow run finished of iteration t (metrics, datasets, curves, figures, models) to
    MLflow and end its run (idempotent: safe to retry)."""
    tracking.finish_iteration(config, iteration, runs, stages, error)
