"""An iteration's bookkeeping around its stages: its MLflow runs opened before and logged from the store after
(also when it fails) — never failing or holding up its model work: an MLflow outage is said in the run's log
("tracking degraded: …") and left for `metareward track` — and its summary as a Prefect artifact."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from metareward.config.campaign import CampaignConfig
from metareward.pipeline.context import ModelRef
from metareward.pipeline.summary import iteration_title, summary_markdown
from metareward.placement.replicas import close_shared_pools
from metareward.tracking import campaign_log
from metareward.tracking.campaign_log import TrackingDegraded
from metareward.training.models import check_model, model_id_of
from tasks.common import iteration_artifact_key
from tasks.stages import IterationStages


# No retries on the tracking tasks: a retry would hold the next model work up for its back-off, and what an
# outage kept from MLflow is logged later from the store (`metareward track`, or the next run of the campaign).
@task(name="start-tracking", cache_policy=NO_CACHE)
def start_tracking(config: CampaignConfig, iteration: int, model_digest: str, model_uri: str) -> dict | None:
    """The campaign run and iteration t's run ids in MLflow (reopened on a re-run); None with tracking off, or
    when MLflow cannot be used (campaign_log.start_iteration: "tracking degraded: …" logged as a warning)."""
    try:
        return campaign_log.start_iteration(config, iteration, model_digest, model_uri)
    except TrackingDegraded as degraded:
        get_run_logger().warning("%s", degraded)
        return None


@task(name="track-iteration", cache_policy=NO_CACHE)
def track_iteration(config: CampaignConfig, iteration: int, runs: dict, stages: list[str],
                    error: str | None = None) -> None:
    """Log the stages this flow run finished of iteration t (metrics, datasets, curves, figures, models) to
    MLflow and end its run (idempotent). Never raises for MLflow: when it cannot be used, "tracking degraded: …"
    (campaign_log.finish_iteration) is logged as a warning and the rest of the iteration's logging skipped."""
    try:
        campaign_log.finish_iteration(config, iteration, runs, stages, error)
    except TrackingDegraded as degraded:
        get_run_logger().warning("%s", degraded)


@contextmanager
def iteration_run(config: CampaignConfig, iteration: int, model_path: str) -> Iterator[IterationStages]:
    """The stages of iteration t on M_t at model_path (t = 0: the seed's SFT on the base model), checked and
    identified by its digest (its model_id.txt: an s3:// checkpoint's weights are not downloaded): MLflow runs opened
    on entry and, on exit, the stages that finished logged (FAILED with the error when the block raised) and the
    iteration's summary published as a markdown artifact."""
    # Not a task: Prefect links a task's returned strings to it by identity, and the model's URI is in `config`.
    check_model(model_path, config.model.chat_template)
    model = ModelRef(model_path, model_id_of(model_path))
    stages = IterationStages(config, iteration, model)  # checks the evaluator before any run is opened
    runs = start_tracking(config, iteration, model.model_id, model.uri)
    logger = get_run_logger()
    if runs:
        logger.info("MLflow: %s is logged to %s (campaign run: %s)", iteration_title(iteration),
                    runs["iteration_link"], runs["campaign_link"])
        stages.mlflow_link = runs["iteration_link"]
    try:
        yield stages
    except Exception as error:
        if runs:
            track_iteration(config, iteration, runs, list(stages.finished), error=f"{type(error).__name__}: {error}")
        raise
    finally:
        close_shared_pools()  # the engine replicas' GPUs are free once an iteration ends, however it ends
        create_markdown_artifact(
            key=iteration_artifact_key(config.name, iteration),
            markdown=summary_markdown(config.name, iteration, model.model_id, stages.finished, stages.mlflow_link,
                                      stages.decision_summary()),
            description=f"{config.name}: {iteration_title(iteration)} stage summary",
        )
    if runs:
        track_iteration(config, iteration, runs, list(stages.finished))
